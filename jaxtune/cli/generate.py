"""`jaxtune generate` (batched, one shot) and `jaxtune chat` (interactive, streamed) on an HF model dir,
optionally with a PEFT adapter on top."""

from __future__ import annotations

import argparse
import sys

from jaxtune.cli.args import add_model_args, add_sampling_args


def _sampling(args, model, tokenizer, template: str | None):
    from jaxtune.generate import SamplingParams, stop_token_ids

    stops = stop_token_ids(model.config, tokenizer, template, extra=args.stop_id)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop_ids=tuple(stops), seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    from jaxtune.generate import load_for_inference
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
    from jaxtune.generate import load_for_inference
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
