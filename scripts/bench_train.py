"""Training throughput, jaxtune vs transformers + PEFT, on the same model shape, batches and optimizer.

    python scripts/bench_train.py --preset tiny --mode lora            # both sides, one table
    python scripts/bench_train.py --preset 8b --mode lora --memory-only # compiled memory estimate only
    python scripts/bench_train.py --preset 8b --quantize nf4 --memory-only  # QLoRA (XLA:TPU: bench/recipe_compile.py)

Each side runs in its own process (peak memory is per process): jaxtune's jitted `train_step` (donated
buffers) and PyTorch eager `LlamaForCausalLM` (+ `peft` LoRA, SDPA attention) with `torch.optim.AdamW`, both
with global-norm clipping at 1.0, LoRA r=16 alpha=32 on all linear layers, random weights, and the same
synthetic full rows. Steady-state tokens/s is the median of the timed steps after warm-up (each step
synchronised), with min and max. MFU uses `train.metrics.train_flops_per_token` against the chip's dense
bf16 peak, with the parameter counts of the jaxtune side's model (`lora.apply.count_params`; PyTorch's
process never loads JAX). `--quantize nf4|int8` stores the frozen base as QLoRA does (`lora.quantize_base`,
the adapted linears); the PyTorch side is then not run (its counterpart is bitsandbytes on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import utils as bu  # noqa: E402

LORA_RANK = 16


def _platform() -> str:
    return "gpu" if bu.gpu_name() else "cpu"


def settings(args) -> dict:
    """The run both sides do: preset defaults for this platform, overridden by flags."""
    plat = args.platform or _platform()
    d = dict(bu.RUN_DEFAULTS[(args.preset, plat)])
    for k in ("batch", "seq", "dtype", "steps", "warmup"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    big = args.preset in ("1b", "8b")
    d.update(preset=args.preset, mode=args.mode, platform=plat, lora_rank=LORA_RANK,
             scan_layers=args.scan if args.scan is not None else args.preset != "tiny",
             remat=args.remat or ("full" if args.preset == "8b" else "none"),
             attention=args.attention, loss_chunk=args.loss_chunk or (1024 if big and d["seq"] % 1024 == 0 else None),
             lr=1e-4, quantize=args.quantize)
    return d


# ------------------------------------------------------------------------------------------------ jaxtune


def _jax_model(s: dict, abstract: bool = False):
    """`(cfg, graphdef, trainable, frozen)` of the preset with LoRA applied (or not); `abstract`: shapes only."""
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from jaxtune.hf.families import from_hf_config
    from jaxtune.lora.apply import apply_lora
    from jaxtune.lora.config import LoraConfig
    from jaxtune.lora.quantize import quantize_base
    from jaxtune.model.transformer import Transformer
    from jaxtune.train.partition import split_trainable, trainable_filter

    dtype = jnp.dtype(s["dtype"])
    cfg = from_hf_config(transformers.LlamaConfig(**bu.hf_config_kwargs(s["preset"])), scan_layers=s["scan_layers"],
                         remat=s["remat"], attention_impl=s["attention"])
    # LoRA: frozen base stored in the compute dtype; full: fp32 master weights, compute in `dtype`.
    param_dtype = dtype if s["mode"] == "lora" else jnp.float32

    lcfg = LoraConfig(rank=s["lora_rank"], alpha=2 * s["lora_rank"], dropout=0.0, target_modules="all-linear",
                      quantize=s.get("quantize"))

    def adapt(model):
        if lcfg.quantize is not None:
            quantize_base(model, lcfg)
        apply_lora(model, lcfg, nnx.Rngs(1))
        return model

    def build():
        model = Transformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        return adapt(model) if s["mode"] == "lora" else model

    if abstract:
        model = nnx.eval_shape(build)
    elif lcfg.quantize is not None:  # quantize real random weights (random codes would all be zero)
        model = nnx.eval_shape(lambda: quantize_base(Transformer(cfg, dtype=dtype, param_dtype=param_dtype,
                                                                 rngs=nnx.Rngs(0)), lcfg))
        _fill_random(model)
        apply_lora(model, lcfg, nnx.Rngs(1))
    else:
        model = nnx.eval_shape(build)
        _fill_random(model)
    if abstract:
        graphdef, trainable, frozen = nnx.split(model, trainable_filter(s["mode"]), ...)
    else:
        graphdef, trainable, frozen = split_trainable(model, trainable_filter(s["mode"]))
    return cfg, graphdef, trainable, frozen


def _random_leaf(key, shape: tuple, dtype, max_elems: int = 2**26):
    """N(0, 0.02) of `shape` (ones for 1-D leaves: norms). The RNG's temporaries are several times the leaf
    (28 GiB for an 8B stacked MLP weight as XLA:CPU compiles it), so a big leaf is drawn one slice of its
    leading axis at a time (`lax.map`), each slice at most `max_elems` elements."""
    import math

    import jax
    import jax.numpy as jnp

    if len(shape) == 1:
        return jnp.ones(shape, dtype)
    size = math.prod(shape)
    n = next((d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and size // d <= max_elems), shape[0])
    chunk = (shape[0] // n, *shape[1:])
    normal = lambda k: (0.02 * jax.random.normal(k, chunk, jnp.float32)).astype(dtype)  # noqa: E731
    return normal(key) if n == 1 else jax.lax.map(normal, jax.random.split(key, n)).reshape(shape)


def _fill_random(model, seed: int = 0) -> None:
    """Give an abstract model random weights, each leaf drawn by one jitted op directly in its dtype, so an
    8B bf16 model never holds an fp32 copy (it must fit a 24 GiB cap); a quantized weight is drawn and
    quantized on its own, so an 8B QLoRA base never exists in bf16 whole."""
    import jax
    from flax import nnx

    from jaxtune.model.quant import is_companion, logical_shape, quantize_weight

    flat = dict(nnx.to_flat_state(nnx.state(model)))
    draw = jax.jit(_random_leaf, static_argnums=(1, 2))
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    for path, var in flat.items():
        spec = var.get_metadata().get("quant")
        if spec is not None:  # a weight stored quantized: drawn in bf16 and quantized, one weight at a time
            module = model
            for k in path[:-1]:
                module = module[k] if isinstance(k, int) else getattr(module, k)
            shape = logical_shape(module, path[-1])
            parts = quantize_weight(draw(next(keys), shape, jax.numpy.bfloat16), spec)
            for part, value in parts.items():
                flat[path if part == "weight" else (*path[:-1], f"{path[-1]}_{part}")].set_value(value)
        elif not is_companion(var):
            var.set_value(draw(next(keys), var.shape, var.dtype))


def _counts(cfg, s: dict, trainable, frozen) -> dict:
    """`params`, `trainable` (jaxtune's count of the adapted model's leaves, the one `train.partition.param_report`
    reports as `lora_params` in LoRA mode) and the train FLOPs per token they give."""
    from jaxtune.lora.apply import count_params
    from jaxtune.train.metrics import train_flops_per_token

    n_train = count_params(trainable)
    n_all = n_train + (cfg.num_params() if s.get("quantize") else count_params(frozen))  # elements, not code bytes
    return dict(params=n_all, trainable=n_train, flops_per_token=train_flops_per_token(cfg, s["seq"], n_all, n_train))


def _jax_step(s: dict):
    from jaxtune.train.optim import OptimConfig, make_optimizer
    from jaxtune.train.step import jit_train_step

    tx = make_optimizer(OptimConfig(lr=s["lr"], warmup_steps=0, schedule="constant"), s["steps"] + s["warmup"] + 1)
    return tx, jit_train_step(tx, loss_chunk=s["loss_chunk"])


def _resolved_attention(cfg, s: dict) -> str:
    """The backend `attention_impl="auto"` picks for this run's training shapes."""
    import jax
    import jax.numpy as jnp

    from jaxtune.model.attention import default_impl

    if s["attention"] != "auto":
        return s["attention"]
    q = jax.ShapeDtypeStruct((s["batch"], s["seq"], cfg.num_attention_heads, cfg.head_dim), jnp.dtype(s["dtype"]))
    return f"auto: {default_impl(q, q)}"


@bu.jaxtune_side
def jax_worker(s: dict) -> dict:
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    cfg, graphdef, trainable, frozen = _jax_model(s)
    tx, step = _jax_step(s)
    opt_state = jax.jit(tx.init)(trainable)
    batches = [jax.device_put({k: jnp.asarray(v) for k, v in bu.synthetic_batch(s["batch"], s["seq"], cfg.vocab_size,
                                                                                  i).items()}) for i in range(3)]
    rng = jax.random.key(0)
    jax.block_until_ready((trainable, frozen, opt_state, batches))
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    compiled = step.lower(graphdef, trainable, frozen, opt_state, batches[0], rng).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    def run(i):
        nonlocal trainable, opt_state
        trainable, opt_state, m = compiled(trainable, frozen, opt_state, batches[i % len(batches)],
                                           jax.random.fold_in(rng, i))
        return float(m["loss"])

    times, losses, first_s = bu.timed_steps(run, s["warmup"], s["steps"])
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    out = dict(bu.summarize(times, s["batch"] * s["seq"]), side="jaxtune", device=dev.device_kind,
               compile_s=compile_s, first_step_s=first_s, setup_s=setup_s, losses=losses,
               **_counts(cfg, s, trainable, frozen), attention=_resolved_attention(cfg, s),
               peak_rss=bu.peak_rss_bytes(), peak_device=stats.get("peak_bytes_in_use"),
               compiled_temp=getattr(mem, "temp_size_in_bytes", None))
    return out


@bu.jaxtune_side
def jax_count_worker(s: dict) -> dict:
    """Parameter counts and FLOPs per token from abstract shapes, for a table without a jaxtune run."""
    cfg, _, trainable, frozen = _jax_model(s, abstract=True)
    return dict(side="jaxtune", **_counts(cfg, s, trainable, frozen))


@bu.jaxtune_side
def jax_memory_worker(s: dict) -> dict:
    """Compile the step on abstract arrays (no weights allocated) and report XLA's buffer assignment: an
    estimate of device memory, labelled so, for shapes this machine cannot hold. With `quantize`, on CPU, XLA's
    loop-invariant code motion is off as in `jaxtune train --dry-run`: it would hoist every scanned layer's
    dequantized weights out of the layer loop (all 32 of an 8B model at once), which no accelerator does."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    cfg, graphdef, trainable, frozen = _jax_model(s, abstract=True)
    tx, step = _jax_step(s)
    opt_state = jax.eval_shape(tx.init, trainable)
    example = bu.synthetic_batch(s["batch"], s["seq"], 8, 0)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example.items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    device = jax.devices()[0]
    hoist_off = device.platform == "cpu" and s.get("quantize")
    options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if hoist_off else None
    compiled = step.lower(graphdef, trainable, frozen, opt_state, batch, rng).compile(compiler_options=options)
    mem = compiled.memory_analysis()
    leaves = jax.tree.leaves((trainable, frozen, opt_state, batch))
    args = int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))
    temp = int(mem.temp_size_in_bytes)
    out_extra = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
    return dict(side="jaxtune", device=device.device_kind, compile_s=time.perf_counter() - t0,
                arguments=args, temp=temp, outputs_not_aliased=out_extra, total=args + temp + out_extra,
                generated_code=int(mem.generated_code_size_in_bytes))


# ------------------------------------------------------------------------------------------------ PyTorch


def hf_worker(s: dict) -> dict:
    import torch

    if s.get("quantize"):
        return {"side": "transformers", "skipped": "QLoRA: its PyTorch counterpart is bitsandbytes (GPU), not run here"}

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Same storage as the jaxtune side: LoRA keeps the frozen base in the compute dtype; full FT keeps fp32
    # master weights and computes under autocast.
    model = bu.torch_llama(s["preset"], dtype if s["mode"] == "lora" else torch.float32, dev,
                           attn_implementation=s["hf_attention"])
    cfg = model.config
    if s["mode"] == "lora":
        try:
            import peft
        except ImportError:
            return {"side": "transformers", "skipped": "peft is not installed"}
        model = peft.get_peft_model(model, peft.LoraConfig(r=s["lora_rank"], lora_alpha=2 * s["lora_rank"],
                                                           lora_dropout=0.0, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0, **({"fused": True} if cuda else {}))
    if s["hf_compile"]:
        model = torch.compile(model)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    batches = []
    for i in range(3):
        b = bu.synthetic_batch(s["batch"], s["seq"], cfg.vocab_size, i)
        batches.append((torch.from_numpy(b["input_ids"]).long().to(dev), torch.from_numpy(b["targets"]).long().to(dev)))
    setup_s = time.perf_counter() - t0

    def step(ids, targets):
        with autocast:
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(i):
        loss = float(step(*batches[i % len(batches)]))
        if cuda:
            torch.cuda.synchronize()
        return loss

    times, losses, first_s = bu.timed_steps(run, s["warmup"], s["steps"])
    return dict(bu.summarize(times, s["batch"] * s["seq"]), side="transformers", losses=losses,
                device=torch.cuda.get_device_name() if cuda else bu.cpu_name(), compile_s=None, first_step_s=first_s,
                setup_s=setup_s, trainable=sum(p.numel() for p in params),
                params=sum(p.numel() for p in model.parameters()), attention=s["hf_attention"],
                peak_rss=bu.peak_rss_bytes(), peak_device=torch.cuda.max_memory_allocated() if cuda else None,
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------------ report


def table(s: dict, results: list[dict], counts: dict) -> str:
    """`counts`: a jaxtune-side `_counts` (params, trainable, flops_per_token), or `{}` when none came back."""
    flops, n = counts.get("flops_per_token"), counts.get("params")
    base = next((r for r in results if r.get("side") == "transformers" and "tokens_per_s" in r), None)
    rows = []
    for r in results:
        if "tokens_per_s" not in r:
            rows.append([r.get("side"), s["mode"], None, None, None, None, None, None, None,
                         r.get("skipped") or r.get("error")])
            continue
        peak = bu.peak_bf16_flops(r.get("device"))
        achieved = flops * r["tokens_per_s"] if flops else None
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        mem = r["peak_device"] if r.get("peak_device") else r["peak_rss"]
        rows.append([r["side"], s["mode"],
                     f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}–{r['tokens_per_s_max']:,.0f})",
                     f"{ratio:.2f}×" if ratio else None, f"{achieved / 1e12:.3g}" if achieved else None,
                     f"{100 * achieved / peak:.1f}%" if peak and achieved else None,
                     bu.fmt_bytes(mem) + (" device" if r.get("peak_device") else " RSS"),
                     r["compile_s"], r["first_step_s"], r.get("attention")])
    params = f"{n / 1e6:.1f}M params" if n else "parameter count unknown: no jaxtune-side result"
    head = (f"preset `{s['preset']}` ({params}), {s['mode']}, batch {s['batch']} × seq {s['seq']}, "
            f"{s['dtype']}, {s['steps']} timed steps after {s['warmup']} warm-up")
    return head + "\n\n" + bu.markdown_table(
        ["side", "mode", "tokens/s median (min–max)", "ratio", "TFLOP/s", "MFU", "peak memory", "compile s",
         "first step s", "attention"], rows)


def memory_table(s: dict, r: dict) -> str:
    head = (f"jaxtune compiled memory estimate ({r.get('device')}; XLA buffer assignment, not a measurement), "
            f"preset `{s['preset']}` {s['mode']}, batch {s['batch']} × seq {s['seq']}, {s['dtype']}, "
            f"remat {s['remat']}, scan_layers {s['scan_layers']}, loss_chunk {s['loss_chunk']}, attention "
            f"{s['attention']}" + (f", base quantized {s['quantize']}" if s.get("quantize") else ""))
    if "total" not in r:
        return f"{head}: failed: {r.get('error')}\n{r.get('log')}"
    row = [bu.fmt_bytes(r["arguments"]), bu.fmt_bytes(r["temp"]), bu.fmt_bytes(r["outputs_not_aliased"]),
           bu.fmt_bytes(r["total"]), r["compile_s"]]
    return head + "\n\n" + bu.markdown_table(
        ["arguments (params+opt+batch)", "temporaries", "outputs not aliased", "total", "compile s"], [row])


WORKERS = {"jaxtune": jax_worker, "transformers": hf_worker, "memory": jax_memory_worker,
           "counts": jax_count_worker}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(bu.PRESETS), default="tiny")
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--sides", default="jaxtune,transformers", help="comma list of jaxtune, transformers")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--platform", choices=("cpu", "gpu"),
                   help="which preset defaults to use (default: gpu when nvidia-smi works)")
    p.add_argument("--attention", default="auto", help="jaxtune attention_impl")
    p.add_argument("--hf-attention", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--hf-compile", action="store_true", help="torch.compile the PyTorch model")
    p.add_argument("--scan", dest="scan", action="store_true", default=None, help="jaxtune scan_layers")
    p.add_argument("--no-scan", dest="scan", action="store_false")
    p.add_argument("--remat", choices=("none", "full", "dots"))
    p.add_argument("--loss-chunk", type=int)
    p.add_argument("--memory-only", action="store_true", help="jaxtune compiled memory estimate, no run")
    p.add_argument("--quantize", choices=("nf4", "int8"), help="QLoRA: store the frozen base quantized (LoRA mode)")
    p.add_argument("--mem-cap-gb", type=float, help="GPU: cap the jaxtune process at this much device memory")
    bu.add_run_args(p, WORKERS, timeout=900, out="bench_train_<preset>_<mode>.{md,json}")
    args = p.parse_args(argv)

    if bu.dispatch_worker(args, WORKERS):
        return 0
    if args.quantize and args.mode != "lora":
        p.error("--quantize stores the frozen base of a LoRA run: use it with --mode lora")

    m = bu.machine()
    s = settings(args)
    s.update(hf_attention=args.hf_attention, hf_compile=args.hf_compile)
    env = bu.jax_env(s["platform"], not args.plain_xla)
    if args.mem_cap_gb and s["platform"] == "gpu":
        total = bu.gpu_memory_bytes()
        if total:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, args.mem_cap_gb * 2**30 / total):.4f}"
    me = str(Path(__file__).resolve())
    results = []
    if args.memory_only:
        r = bu.spawn_worker(me, "memory", s, timeout=args.timeout, env=env)
        results.append(r)
        report = memory_table(s, r)
    else:
        for side in args.sides.split(","):
            r = bu.spawn_worker(me, side, s, timeout=args.timeout, env=env if side == "jaxtune" else bu.torch_env())
            r.setdefault("side", side)
            results.append(r)
        counts = next((r for r in results if "flops_per_token" in r), None)
        if counts is None:  # no jaxtune run to count the model: count it from abstract shapes alone
            counts = bu.spawn_worker(me, "counts", s, timeout=args.timeout, env=env)
        report = table(s, results, counts if "flops_per_token" in counts else {})
    envs = f"jaxtune env: {bu.env_note(env)}; PyTorch env: {bu.env_note(bu.torch_env())}"
    text = (f"{report}\n\n{envs}\n\nMachine: {bu.machine_markdown(m)}\n\n"
            f"Command: `{bu.command('bench_train.py', argv)}`\n")
    print(text)
    stem = (f"bench_train_{s['preset']}_{s['mode']}" + (f"_{args.quantize}" if args.quantize else "")
            + ("_memory" if args.memory_only else ""))
    bu.write_outputs(args.out, stem, text, {"settings": s, "machine": m, "results": results})
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
