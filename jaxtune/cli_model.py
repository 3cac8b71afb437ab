"""`jaxtune info MODEL_DIR`: what a checkpoint is, read through the same path the loader uses."""

from __future__ import annotations

import argparse


def info_lines(model_dir: str) -> list[str]:
    from jaxtune.convert.hf_load import load_hf_config, weight_files
    from jaxtune.model.config import from_hf_config

    from pathlib import Path

    hf = load_hf_config(model_dir)
    cfg = from_hf_config(hf)
    files = weight_files(Path(model_dir))
    rope = f"theta={cfg.rope_theta:g}, type={cfg.rope_type}"
    if cfg.rope_type != "default":
        rope += f", factor={cfg.rope_factor:g}"
    window = "none" if not any(cfg.sliding_layers) else (
        f"{cfg.sliding_window} on {sum(cfg.sliding_layers)}/{cfg.num_hidden_layers} layers")
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return [
        f"model dir      {model_dir}",
        f"family         {cfg.model_type} ({', '.join(getattr(hf, 'architectures', None) or ['?'])})",
        f"parameters     {cfg.num_params():,}",
        f"dtype          {dtype}",
        f"vocab          {cfg.vocab_size}",
        f"layers         {cfg.num_hidden_layers}",
        f"hidden / mlp   {cfg.hidden_size} / {cfg.intermediate_size}",
        f"heads / kv     {cfg.num_attention_heads} / {cfg.num_key_value_heads} (head_dim {cfg.head_dim})",
        f"rope           {rope}",
        f"max positions  {cfg.max_position_embeddings}",
        f"tied embedding {cfg.tie_word_embeddings}",
        f"bias q/k/v, o  {cfg.qkv_bias}, {cfg.o_bias}   qk-norm {cfg.qk_norm}",
        f"sliding window {window}",
        f"weights        {', '.join(f.name for f in files)}",
    ]


def _info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines(args.model_dir)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="describe an HF model directory (family, params, heads, rope…)")
    p.add_argument("model_dir")
    p.set_defaults(func=_info)
