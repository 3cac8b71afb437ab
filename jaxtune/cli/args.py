"""Arguments several commands share. Imports nothing heavy: the parser is built before jax is imported."""

from __future__ import annotations

import argparse

from jaxtune.model.config import DTYPES

DTYPE_CHOICES = tuple(DTYPES)


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="HF model directory (safetensors)")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to apply on top of --model")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the adapter's if it has one, else --model)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="compute and parameter dtype")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-id", type=int, action="append", default=[],
                   help="extra token id to stop at (repeatable); EOS and the template's end-of-turn are included")
    p.add_argument("--template", help="chat template: chatml, llama3, alpaca, story or a .jinja file "
                                      "(generate: default raw text; chat: default the tokenizer's own)")
