"""`jaxtune info MODEL_DIR` (what a checkpoint is, read through the same path the loader uses) and `jaxtune
params MODEL_DIR` (LoRA vs full fine-tune size and memory, from config.json alone)."""

from __future__ import annotations

import argparse

from jaxtune.cli.args import DTYPE_CHOICES


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def info_lines(model_dir: str) -> list[str]:
    """What the checkpoint is. Weight files are opened for their headers only (a truncated or corrupt file,
    or an integer weight, is an error here), never read."""
    from pathlib import Path

    import numpy as np

    from jaxtune.hf.families import family
    from jaxtune.hf.load import read_config, weight_headers

    hf, cfg = read_config(model_dir)
    headers = weight_headers(Path(model_dir), family(cfg.model_type))
    tensors = [t for h in headers.values() for t in (h or {}).values()]
    nbytes = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape in tensors)
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return [
        f"model dir      {model_dir}",
        f"family         {cfg.model_type} ({', '.join(getattr(hf, 'architectures', None) or ['?'])})",
        f"parameters     {cfg.num_params():,}",
        f"dtype          {dtype}",
        f"vocab          {cfg.vocab_size}",
        f"layers         {cfg.num_hidden_layers}",
        f"hidden / mlp   {cfg.hidden_size} / {cfg.intermediate_size} ({cfg.hidden_act})",
        *_expert_lines(cfg),
        f"heads / kv     {cfg.num_attention_heads} / {cfg.num_key_value_heads} (head_dim {cfg.head_dim})",
        f"rope           {_rope(cfg)}",
        f"max positions  {cfg.max_position_embeddings}",
        f"tied embedding {cfg.tie_word_embeddings}",
        f"bias q/k/v, o  {cfg.qkv_bias}, {cfg.o_bias}   qk-norm {cfg.qk_norm}",
        f"norms          {cfg.norm_layout}, {NORM_WEIGHTS[cfg.norm_style]}, eps {cfg.rms_norm_eps:g}",
        *_scaling_lines(cfg),
        f"sliding window {_window(cfg)}",
        f"weights        {', '.join(f.name for f in headers)} ({len(tensors)} tensors, {_size(nbytes)})",
    ]


# How each ModelConfig.norm_style applies the RMSNorm weight, for `info`.
NORM_WEIGHTS = {"llama": "w·x", "fp32": "w·x in fp32", "gemma": "(1 + w)·x in fp32"}


def _rope(cfg) -> str:
    rope = f"theta={cfg.rope_theta:g}, type={cfg.rope_type}"
    if cfg.rope_type != "default":
        rope += f", factor={cfg.rope_factor:g}"
    if cfg.rope_type in ("llama3", "longrope"):
        rope += f", original context {cfg.rope_original_max_position}"
    if cfg.rope_type == "longrope":
        rope += f", attention factor {cfg.rope_attention_factor:.4g}"
    if cfg.partial_rotary_factor != 1.0:
        rope += f", rotary dims {cfg.rotary_dim}/{cfg.head_dim}"
    return rope


def _window(cfg) -> str:
    if not any(cfg.sliding_layers):
        return "none"
    window = f"{cfg.sliding_window} on {sum(cfg.sliding_layers)}/{cfg.num_hidden_layers} layers"
    return window if cfg.sliding_rope_theta is None else f"{window}, their rope theta={cfg.sliding_rope_theta:g}"


def _expert_lines(cfg) -> list[str]:
    if not cfg.num_experts:
        return []
    line = (f"experts        {cfg.num_experts}, top-{cfg.num_experts_per_tok} "
            f"({'renormalised' if cfg.norm_topk_prob else 'not renormalised'}), expert mlp "
            f"{cfg.moe_intermediate_size or cfg.intermediate_size}, on {sum(cfg.moe_layers)}/{cfg.num_hidden_layers} "
            "layers")
    return [line + (f", router aux loss coef {cfg.router_aux_loss_coef:g}" if cfg.router_aux_loss_coef else "")]


def _scaling_lines(cfg) -> list[str]:
    """Score scale, soft-caps, multipliers and fused projections: only where a family departs from Llama."""
    lines = []
    if cfg.attention_scale is not None:
        lines.append(f"scores scale   {cfg.attention_scale:.4g} (not 1/sqrt(head_dim))")
    if cfg.attn_softcap is not None or cfg.final_softcap is not None:
        lines.append(f"soft-caps      attention {cfg.attn_softcap}, final logits {cfg.final_softcap}")
    scales = [f"embedding ×{cfg.embedding_multiplier:g}" if cfg.embedding_multiplier != 1.0 else "",
              f"residual ×{cfg.residual_multiplier:g}" if cfg.residual_multiplier != 1.0 else "",
              f"logits ÷{cfg.logits_divisor:g}" if cfg.logits_divisor != 1.0 else ""]
    if any(scales):
        lines.append(f"multipliers    {', '.join(s for s in scales if s)}")
    fused = [name for name, on in (("qkv_proj", cfg.fused_qkv), ("gate_up_proj", cfg.fused_gate_up)) if on]
    if fused:
        lines.append(f"fused          {', '.join(fused)}")
    return lines


def check_lines(model_dir: str) -> tuple[list[str], str | None]:
    """Every tensor read: one line per tensor holding NaN or Inf and a summary, and the error naming the
    first such tensor (None when all are finite)."""
    from pathlib import Path

    from jaxtune.hf.families import family
    from jaxtune.hf.load import load_config, nonfinite_counts

    fam = family(load_config(model_dir).model_type)
    counts = list(nonfinite_counts(Path(model_dir), fam))
    bad = [(f, name, nan, inf) for f, name, nan, inf in counts if nan or inf]
    lines = [f"non-finite     {f}: {name}  {nan} NaN, {inf} Inf" for f, name, nan, inf in bad]
    files = len({f for f, *_ in counts})
    lines.append(f"checked        {len(counts)} tensors in {files} file(s): "
                 + (f"{len(bad)} with NaN/Inf" if bad else "no NaN/Inf, dtypes ok"))
    if not bad:
        return lines, None
    f, name, nan, inf = bad[0]
    more = f" (and {len(bad) - 1} more tensor(s), listed above)" if len(bad) > 1 else ""
    return lines, f"{f}: tensor {name!r} has {nan} NaN and {inf} Inf values{more}"


def _info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines(args.model_dir)))
    if args.check:
        from jaxtune.hf.load import CheckpointError

        lines, problem = check_lines(args.model_dir)
        print("\n".join(lines))
        if problem:
            raise CheckpointError(problem)
    return 0


def _targets(spec: str):
    """`all-linear`, a comma list of module names, or (anything with regex characters) a regex string."""
    if spec == "all-linear" or any(c in spec for c in "*()[]|^$\\+?"):
        return spec
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB" if n >= 2**24 else f"{n / 2**20:9.3f} MiB"


def params_lines(model_dir: str, rank: int, alpha: float | None, targets: str, dtype: str,
                 optimizer: str = "adamw", target_parameters: str | None = None, quantize: str | None = None,
                 quantize_scope: str = "targets") -> list[str]:
    from jaxtune.hf.load import load_config
    from jaxtune.lora.config import LoraConfig
    from jaxtune.model.config import dtype_name, parse_dtype
    from jaxtune.train.optim import OptimConfig
    from jaxtune.train.partition import param_report

    cfg = load_config(model_dir)
    experts = [s.strip() for s in (target_parameters or "").split(",") if s.strip()] or None
    lcfg = LoraConfig(rank=rank, alpha=2.0 * rank if alpha is None else alpha, target_modules=_targets(targets),
                      target_parameters=experts, dropout=0.0, quantize=quantize, quantize_scope=quantize_scope)
    rep = param_report(cfg, lcfg, parse_dtype(dtype, "--dtype"), OptimConfig(name=optimizer))
    total = rep.base_params + rep.lora_params
    lines = [
        f"model        {model_dir} ({cfg.model_type}, {rep.base_params:,} parameters)",
        f"LoRA         rank {lcfg.rank}, alpha {lcfg.alpha:g}, targets {targets}"
        + (f" + {', '.join(experts)}" if experts else "") + f" ({rep.lora_modules} modules)",
        f"trainable    {rep.lora_params:,} / {total:,} = {100 * rep.lora_fraction:.4f}% (LoRA)",
        f"             {rep.base_params:,} / {rep.base_params:,} = 100% (full fine-tune)",
        f"memory       base weights {dtype_name(dtype)}"
        + (f" (QLoRA: {quantize}, scope {quantize_scope})" if quantize else "")
        + f", LoRA fp32, optimizer {optimizer}; activations excluded",
        f"{'':13}{'weights':>13}{'grads':>13}{'optimizer':>13}{'total':>13}",
    ]
    rows = [("LoRA", rep.lora_memory)] + ([(f"QLoRA {quantize}", rep.qlora_memory)] if quantize else [])
    for label, mem in rows + [("full", rep.full_memory)]:
        lines.append(f"  {label:<11}" + "".join(f"{_gib(mem[k]):>13}" for k in ("weights", "grads", "optimizer",
                                                                                   "total")))
    return lines


def _params(args: argparse.Namespace) -> int:
    print("\n".join(params_lines(args.model_dir, args.lora_rank, args.lora_alpha, args.targets, args.dtype,
                                 args.optimizer, args.target_parameters, args.quantize, args.quantize_scope)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="describe an HF model directory (family, params, heads, rope…)")
    p.add_argument("model_dir")
    p.add_argument("--check", action="store_true",
                   help="also read every tensor: report NaN/Inf per tensor and exit 2 if any")
    p.set_defaults(func=_info)

    p = sub.add_parser("params", help="trainable parameters and training memory: LoRA vs full fine-tune")
    p.add_argument("model_dir", help="HF model directory (only config.json is read)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 × rank")
    p.add_argument("--targets", default="all-linear",
                   help="all-linear, a comma list such as q_proj,v_proj, or a regex over module names")
    p.add_argument("--target-parameters", default=None,
                   help="MoE expert tensors as PEFT names them, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="base weight dtype")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), default="adamw")
    p.add_argument("--quantize", choices=("nf4", "int8"), default=None,
                   help="also report QLoRA: the frozen base stored as the recipe's lora.quantize would store it")
    p.add_argument("--quantize-scope", choices=("targets", "all-linear", "all"), default="targets",
                   help="which base weights --quantize stores quantized (lora.quantize_scope)")
    p.set_defaults(func=_params)
