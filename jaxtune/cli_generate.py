"""`jaxtune generate` (batched, one shot) and `jaxtune chat` (interactive, streamed), plus the model loading
shared with `jaxtune eval …`: an HF model dir, optionally with a PEFT adapter on top."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def load_for_inference(model_dir: str, adapter: str | None = None, *, tokenizer: str | None = None,
                       dtype: str = "float32"):
    """`(model, tokenizer)`. The tokenizer comes from `tokenizer`, else the adapter dir when it carries one
    (jaxtune's export saves the training chat template there), else the model dir."""
    import jax.numpy as jnp

    from jaxtune import load_pretrained, load_tokenizer

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    model = load_pretrained(model_dir, getattr(jnp, dtype))
    if adapter:
        from jaxtune.export import load_peft_adapter

        model = load_peft_adapter(model, adapter)
    if tokenizer is None:
        tokenizer = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    return model, load_tokenizer(tokenizer)


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="HF model directory (safetensors)")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to apply on top of --model")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the adapter's if it has one, else --model)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute and parameter dtype")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-id", type=int, action="append", default=[],
                   help="extra token id to stop at (repeatable); EOS and the template's end-of-turn are included")
    p.add_argument("--template", help="chat template: chatml, llama3, alpaca or a .jinja file "
                                      "(generate: default raw text; chat: default the tokenizer's own)")


def _sampling(args, model, tokenizer, template: str | None):
    from jaxtune.export import stop_token_ids
    from jaxtune.generate import SamplingParams

    stops = stop_token_ids(model.config, tokenizer, template, extra=args.stop_id)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop_ids=tuple(stops), seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    from jaxtune.data.chat import resolve_template
    from jaxtune.generate import generate, prompt_ids

    model, tok = load_for_inference(args.model, args.adapter, tokenizer=args.tokenizer, dtype=args.dtype)
    template = resolve_template(args.template, tok) if args.template else None
    params = _sampling(args, model, tok, template)
    gen = generate(model, [prompt_ids(tok, p, template) for p in args.prompt], params)
    for i, (prompt, tokens, reason) in enumerate(zip(args.prompt, gen.tokens, gen.finish_reasons)):
        if len(args.prompt) > 1:
            print(f"=== {i}: {prompt!r} ({reason}, {len(tokens)} tokens)")
        print(tok.decode(tokens, skip_special_tokens=True))
    return 0


def stream_text(tokenizer, token_iter):
    """Turn a token stream into text pieces; holds back bytes of an unfinished UTF-8 character."""
    ids: list[int] = []
    shown = ""
    for t in token_iter:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != shown:
        yield text[len(shown):]


def _chat(args: argparse.Namespace) -> int:
    from jaxtune.data.chat import require_template, resolve_template
    from jaxtune.generate import prompt_ids, stream

    model, tok = load_for_inference(args.model, args.adapter, tokenizer=args.tokenizer, dtype=args.dtype)
    try:
        template = require_template(resolve_template(args.template, tok), tok)
    except ValueError as e:
        print(f"error: {str(e).replace('data.chat_template', '--template')}", file=sys.stderr)
        return 2
    params = _sampling(args, model, tok, template)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    start = len(history)
    print("chat: empty line or /quit to exit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/quit"):
            break
        if line.strip() == "/reset":
            del history[start:]
            continue
        reply = ""
        for piece in stream_text(tok, stream(model, prompt_ids(tok, line, template, history), params)):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate continuations for one or more prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    add_sampling_args(p, 128)
    p.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="interactive chat with streamed output (applies the chat template)")
    add_model_args(c)
    c.add_argument("--system", help="system message for the conversation")
    add_sampling_args(c, 256)
    c.set_defaults(func=_chat)
