"""`jaxtune params` (LoRA vs full fine-tune size and memory) and `jaxtune export` (merged HF / PEFT adapter).

A training run stores its adapter as a PEFT directory under `RUN/export/adapter`; `--run RUN` reads it there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


def _targets(spec: str):
    """`all-linear`, a comma list of module names, or (anything with regex characters) a regex string."""
    if spec == "all-linear" or any(c in spec for c in "*()[]|^$\\+?"):
        return spec
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB" if n >= 2**24 else f"{n / 2**20:9.3f} MiB"


def params_lines(model_dir: str, rank: int, alpha: float | None, targets: str, dtype: str,
                 optimizer: str = "adamw") -> list[str]:
    import jax.numpy as jnp

    from jaxtune.convert.hf_load import load_config
    from jaxtune.lora import LoraConfig, param_report
    from jaxtune.train.optim import OptimConfig

    cfg = load_config(model_dir)
    lcfg = LoraConfig(rank=rank, alpha=2.0 * rank if alpha is None else alpha, target_modules=_targets(targets))
    rep = param_report(cfg, lcfg, getattr(jnp, _DTYPES[dtype]), OptimConfig(name=optimizer))
    total = rep.base_params + rep.lora_params
    lines = [
        f"model        {model_dir} ({cfg.model_type}, {rep.base_params:,} parameters)",
        f"LoRA         rank {lcfg.rank}, alpha {lcfg.alpha:g}, targets {targets} ({rep.lora_modules} modules)",
        f"trainable    {rep.lora_params:,} / {total:,} = {100 * rep.lora_fraction:.4f}% (LoRA)",
        f"             {rep.base_params:,} / {rep.base_params:,} = 100% (full fine-tune)",
        f"memory       base weights {_DTYPES[dtype]}, LoRA fp32, optimizer {optimizer}; activations excluded",
        f"{'':13}{'weights':>13}{'grads':>13}{'optimizer':>13}{'total':>13}",
    ]
    for label, mem in (("LoRA", rep.lora_memory), ("full", rep.full_memory)):
        lines.append(f"  {label:<11}" + "".join(f"{_gib(mem[k]):>13}" for k in ("weights", "grads", "optimizer",
                                                                                   "total")))
    return lines


def _params(args: argparse.Namespace) -> int:
    print("\n".join(params_lines(args.model_dir, args.lora_rank, args.lora_alpha, args.targets, args.dtype,
                                 args.optimizer)))
    return 0


def _source_param_dtype(model_dir: Path):
    import json

    import jax.numpy as jnp

    raw = json.loads((model_dir / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(name, jnp.float32)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _export(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jaxtune.convert.hf_load import load_pretrained, load_tokenizer
    from jaxtune.export import load_peft_adapter, save_merged, save_peft_adapter

    model_dir = Path(args.model)
    adapter = Path(args.adapter) if args.adapter else None
    if args.run:
        adapter = Path(args.run) / "export" / "adapter"
        if not adapter.is_dir():
            raise SystemExit(f"jaxtune export: {adapter} not found; a run stores its PEFT adapter there "
                             "(or pass --adapter DIR)")
    if args.peft_out and adapter is None:
        raise SystemExit("jaxtune export: --peft-out needs an adapter (--adapter or --run)")
    # Base weights stay in their stored dtype (exact); merging upcasts each tensor to fp32 anyway.
    model = load_pretrained(model_dir, dtype=jnp.float32, param_dtype=_source_param_dtype(model_dir))
    if adapter is not None:
        model = load_peft_adapter(model, adapter)
    tok_dir = next((d for d in (adapter, model_dir) if d is not None and _has_tokenizer(d)), None)
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    dtype = _DTYPES[args.dtype] if args.dtype else None
    out = save_merged(model, tokenizer, args.out, source_dir=model_dir, dtype=dtype, chat_template=template,
                      max_shard_size=args.max_shard_size)
    print(f"merged model  {out}")
    if args.peft_out:
        save_peft_adapter(model, args.peft_out, base_model_name_or_path=str(model_dir), tokenizer=tokenizer,
                          chat_template=template)
        print(f"PEFT adapter  {args.peft_out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("params", help="trainable parameters and training memory: LoRA vs full fine-tune")
    p.add_argument("model_dir", help="HF model directory (only config.json is read)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 × rank")
    p.add_argument("--targets", default="all-linear",
                   help="all-linear, a comma list such as q_proj,v_proj, or a regex over module names")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="base weight dtype")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), default="adamw")
    p.set_defaults(func=_params)

    e = sub.add_parser("export", help="merged HF checkpoint (+ PEFT adapter) from a base model and an adapter")
    e.add_argument("--model", required=True, help="base HF model directory")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT LoRA adapter directory (from jaxtune, PEFT or TRL)")
    src.add_argument("--run", help="jaxtune run directory (reads its adapter from RUN/export/adapter)")
    e.add_argument("--out", required=True, help="output directory for the merged model (replaced atomically)")
    e.add_argument("--peft-out", help="also write the adapter in PEFT format here")
    e.add_argument("--dtype", choices=sorted(_DTYPES), help="exported weight dtype (default: the base model's)")
    e.add_argument("--chat-template", help=".jinja file to store as the tokenizer's chat template (the one "
                                           "training used)")
    e.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 2GB)")
    e.set_defaults(func=_export)
