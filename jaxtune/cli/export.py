"""`jaxtune export`: a merged HF checkpoint (and optionally a PEFT adapter) from a base model and an adapter.

A training run stores its adapter as a PEFT directory under `RUN/export/adapter` (or its recipe's
`output.export_dir`); `--run RUN` reads it there.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from jaxtune.cli.args import DTYPE_CHOICES


def _source_param_dtype(model_dir: Path):
    import json

    from jaxtune.model.config import DTYPES, parse_dtype

    raw = json.loads((model_dir / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    return parse_dtype(name if name in DTYPES else "float32")


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _check_apart(out: Path, peft_out: Path) -> None:
    a, b = out.resolve(), peft_out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"--out {out} and --peft-out {peft_out} overlap; give them separate directories")


def _export(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jaxtune.export import save_merged
    from jaxtune.files import check_target
    from jaxtune.hf.load import load_pretrained, load_tokenizer
    from jaxtune.lora.peft import load_peft_adapter, save_peft_adapter

    model_dir = Path(args.model)
    adapter = Path(args.adapter) if args.adapter else None
    qlora = None
    if args.run:
        from jaxtune.files import is_url
        from jaxtune.recipe import run_exports, run_quantization

        qlora = run_quantization(args.run)

        exports = run_exports(args.run)
        if is_url(exports):
            raise SystemExit(f"jaxtune export: run {args.run} exported to {exports}; copy {exports}/adapter here "
                             "(e.g. gcloud storage cp -r) and pass --adapter DIR")
        adapter = Path(exports) / "adapter"
        if not adapter.is_dir():
            raise SystemExit(f"jaxtune export: {adapter} not found; a run stores its PEFT adapter there "
                             "(or pass --adapter DIR)")
    if args.peft_out and adapter is None:
        raise SystemExit("jaxtune export: --peft-out needs an adapter (--adapter or --run)")
    if args.peft_out:
        _check_apart(Path(args.out), Path(args.peft_out))
    protect = {"the adapter directory": adapter, "the source model directory": model_dir}
    for target in filter(None, (args.out, args.peft_out)):  # refuse before the slow part, not after --out is written
        check_target(target, force=args.force, protect=protect)
    # Base weights stay in their stored dtype (exact); merging upcasts each tensor to fp32 anyway.
    prepare = None
    if qlora is not None:
        from jaxtune.lora.quantize import quantize_base

        print(f"run {args.run} trained against a {qlora.quantize} base: merging onto that base, dequantized")
        prepare = functools.partial(quantize_base, cfg=qlora)
    model = load_pretrained(model_dir, dtype=jnp.float32, param_dtype=_source_param_dtype(model_dir),
                            prepare=prepare)
    if adapter is not None:
        model = load_peft_adapter(model, adapter)
    tok_dir = next((d for d in (adapter, model_dir) if d is not None and _has_tokenizer(d)), None)
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    guard = {"force": args.force, "protect": protect}
    out = save_merged(model, tokenizer, args.out, source_dir=model_dir, dtype=args.dtype, chat_template=template,
                      max_shard_size=args.max_shard_size, **guard)
    print(f"merged model  {out}")
    if args.peft_out:
        save_peft_adapter(model, args.peft_out, base_model_name_or_path=str(model_dir), tokenizer=tokenizer,
                          chat_template=template, **guard)
        print(f"PEFT adapter  {args.peft_out}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="merged HF checkpoint (+ PEFT adapter) from a base model and an adapter")
    e.add_argument("--model", required=True, help="base HF model directory")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT LoRA adapter directory (from jaxtune, PEFT or TRL)")
    src.add_argument("--run", help="jaxtune run directory (reads its adapter from RUN/export/adapter, or from the "
                                   "run's output.export_dir)")
    e.add_argument("--out", required=True, help="output directory for the merged model: new, empty or a previous "
                                                "jaxtune export (replaced atomically)")
    e.add_argument("--peft-out", help="also write the adapter in PEFT format here")
    e.add_argument("--dtype", choices=DTYPE_CHOICES, help="exported weight dtype (default: the base model's)")
    e.add_argument("--chat-template", help=".jinja file to store as the tokenizer's chat template (the one "
                                           "training used)")
    e.add_argument("--force", action="store_true", help="replace --out/--peft-out even if jaxtune did not write "
                   "them (never the model, adapter, run or current directory)")
    e.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 2GB)")
    e.set_defaults(func=_export)
