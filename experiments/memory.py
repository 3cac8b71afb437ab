"""LoRA vs QLoRA vs full fine-tuning on Llama-3-8B and Llama-3-70B shapes: parameter counts, analytic
weights + grads + optimizer bytes, and the peak memory XLA's memory analysis gives for one compiled train
step, on abstract weights (nothing is downloaded or allocated).

    python experiments/memory.py [--quick] [--out DIR]      # writes DIR/memory.json, prints a markdown table

Why compile-only: the claim under test ("LoRA trains 0.1-1% of the parameters and cuts memory from 80+ GB to
24-32 GB for large models") is about real model shapes, which this machine cannot hold. Each row compiles the
recipe's train step with `scripts/bench/recipe_compile.py` (`jaxtune.train.plan.lower_train_step`) in a
subprocess of its own, so one compile's memory is freed before the next, and counts parameters and
weights/grads/optimizer bytes with `jaxtune.train.partition.param_report` (what `jaxtune params` prints).

The step: seq_len 4096, micro-batch 1 sequence per data shard (gradient accumulation as each recipe sets
it), `remat: full`, scanned layers, bf16 compute. All three methods of a shape compile from one recipe, so
they differ only in the method:

- Llama-3-8B from `configs/llama3-8b-qlora.yaml` (its `add_special_tokens`-free step; the bf16 LoRA recipe
  trains three embedding rows and uses seq 2048, which would make the comparison unequal).
- Llama-3-70B from `configs/llama3-70b-lora-v5p-64.yaml`.
- methods: `lora` (r16 all-linear on a bf16 base), `qlora` (the same on an NF4 base), `full` (every weight,
  bf16 weights and AdamW state: `model.param_dtype=bfloat16`; the recipes' own full-FT default is fp32 master
  weights, which would add 2 bytes per parameter).
- targets: `cpu` (XLA:CPU, one device, blockwise attention: an estimate for one GPU, high by XLA:CPU's fp32
  copies of bf16 weights, docs/benchmarks.md §5d), `v5e:1x1` (XLA:TPU, one 16 GiB v5e chip, 8B) and
  `v5p:2x4x4` (XLA:TPU, the 70B recipe's v5p-64 slice: 32 chips, fsdp 8 x tensor 4, figures per chip).
  XLA:TPU refuses a step larger than the chip: that row has `does_not_fit` (XLA's one line) and no peak.

`quick=True` runs the same path on the tiny quickstart Llama (seq 128, XLA:CPU only; its rows compile in one
subprocess to keep the test short).

Rows are cached as `OUT/cache/row-KEY.json`, KEY a hash of (recipe text, overrides, target, jaxtune version,
row schema): a re-run compiles only rows it has not got. The parameter report, the same for every target of
a shape, is cached once per shape beside them (`analytic-KEY.json`). Compile times are cold (no JAX
compilation cache).

Row schema (one flat dict per model shape x method x target; bytes are ints, GiB = 2**30 bytes):

    model            "Llama-3-8B" | "Llama-3-70B" | "tiny-llama"
    method           "lora" | "qlora" | "full";  method_desc: e.g. "LoRA r16 all-linear, bf16 base"
    recipe, overrides  the recipe file and its --set overrides (one string, space-separated)
    target           "cpu" | a libtpu topology such as "v5e:1x1";  backend: "XLA:CPU" | "XLA:TPU"
    device           XLA's device kind (None when refused);  devices: chips/devices the step is sharded over
    mesh             e.g. "data 1", "fsdp 8 x tensor 4"
    seq_len, batch, grad_accum, remat, attention
                     tokens per sequence, sequences per micro-batch per data shard, micro-batches per step,
                     the remat policy, the attention backend ("auto" on TPU picks splash)
    base_params      parameters of the base model
    total_params     base + adapter parameters (what PEFT's print_trainable_parameters counts)
    trainable_params, trainable_pct   trained parameters, and their share of total_params in percent
    weights_bytes, grads_bytes, optimizer_bytes, wgo_bytes, wgo_gib
                     analytic weights / grads / AdamW state / their sum, activations excluded (param_report)
    arguments_gib, temporaries_gib, peak_gib, peak_bytes
                     XLA memory_analysis per device: arguments, temporaries, peak = arguments + outputs -
                     aliased + temporaries (None when refused)
    device_memory_gib  the target chip's HBM (None for cpu);  fits: True/False on TPU, None on cpu
    does_not_fit     XLA:TPU's one-line refusal, else None
    peak_vs_full     this row's peak / full fine-tuning's peak for the same model and target (None if either
                     is missing)
    compile_s        seconds the compile took (lowering included), cold
    label            "estimate (compile-only memory analysis, no weights allocated)"
    note             how to read the figure for this backend
    key, cached, jaxtune_version   the cache key, whether this call read the row from the cache, the version
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxtune.files import write_text_atomic  # noqa: E402
from jaxtune.version import __version__  # noqa: E402

SCHEMA = 1  # bump when a row's fields or their meaning change: cached rows are then recompiled
LABEL = "estimate (compile-only memory analysis, no weights allocated)"
GIB = 2**30
DEFAULT_OUT = REPO / "runs" / "experiments" / "memory"
# HBM per chip: v5e 16 GiB, v5p 95 GB (docs/tpu.md).
CHIP_MEMORY = {"v5e": 16 * GIB, "v5p": 95 * 10**9}
NOTES = {
    "cpu": "XLA:CPU, one device: converts bf16 matmul operands to fp32, so high for a GPU by those copies "
           "(docs/benchmarks.md §5d)",
    "tpu": "XLA:TPU compile-only (libtpu), per chip: bf16 matmuls and splash attention",
}

METHODS = {
    "lora": ("LoRA r16 all-linear, bf16 base", ["lora.quantize=null"]),
    "qlora": ("QLoRA r16 all-linear, NF4 base", ["lora.quantize=nf4"]),
    "full": ("full fine-tuning, bf16 weights, AdamW", ["train.mode=full", "lora=null", "model.param_dtype=bfloat16"]),
}
# The step every row compiles (the recipes set these already; stated so a recipe edit cannot change it).
STEP = ["model.dtype=bfloat16", "model.scan_layers=true", "model.remat=full"]
CPU = ["model.attention_impl=blockwise"]  # XLA-visible flash-style attention; cpu_flash is a custom call
# (model, recipe, step overrides, {target: overrides}, methods in table order)
SHAPES = [
    ("Llama-3-8B", "configs/llama3-8b-qlora.yaml", ["data.seq_len=4096"],
     {"cpu": CPU, "v5e:1x1": []}),
    # On one CPU device: 4 micro-batches of 1 row. On v5p-64: the recipe's 32 rows / 4 micro-batches = 8 rows
    # over fsdp 8, so 1 row per data shard there too.
    ("Llama-3-70B", "configs/llama3-70b-lora-v5p-64.yaml", ["data.seq_len=4096"],
     {"cpu": [*CPU, "mesh={data: 1}", "train.batch_size=4"], "v5p:2x4x4": []}),
]
QUICK = [("tiny-llama", "configs/quickstart.yaml", ["data.seq_len=128", "train.batch_size=1"], {"cpu": CPU})]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([*parts, __version__, SCHEMA]).encode()).hexdigest()[:16]


def jobs(quick: bool = False) -> list[dict]:
    """Every row to compute: model, method, recipe, target, overrides, and the cache key. `analytic` are the
    overrides of the one `param_report` per shape (with the QLoRA section it gives all three methods' bytes)."""
    out = []
    for model, recipe, step, targets in QUICK if quick else SHAPES:
        text = (REPO / recipe).read_text()
        analytic = [*STEP, *step, *METHODS["qlora"][1]]
        for target, target_over in targets.items():
            for method, (desc, method_over) in METHODS.items():
                overrides = [*STEP, *step, *method_over, *target_over]
                out.append({"model": model, "method": method, "method_desc": desc, "recipe": recipe,
                            "target": target, "overrides": overrides, "key": _key(text, overrides, target),
                            "analytic": analytic, "analytic_key": _key(text, analytic, "param_report")})
    return out


# --------------------------------------------------------------------------------------- in the subprocess


def _analytic(job: dict, cache: Path) -> dict:
    """`jaxtune params`' figures for the job's shape (parameter counts; weights, grads and optimizer bytes of
    LoRA, QLoRA and full fine-tuning), computed once per shape: param_report builds the unscanned abstract
    model three times, which takes longer than a CPU compile at 70B."""
    path = cache / f"analytic-{job['analytic_key']}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import transformers
    from bench.recipes import ARCHITECTURES

    from jaxtune.hf.families import from_hf_config
    from jaxtune.model.config import parse_dtype
    from jaxtune.recipe import load_recipe
    from jaxtune.train.partition import param_report

    cfg = load_recipe(REPO / job["recipe"], job["analytic"])
    cls, kw = ARCHITECTURES[Path(job["recipe"]).name]
    # The optimizer state's shape does not depend on the schedule; param_report builds it for a 1-step run.
    optim = dataclasses.replace(cfg.optim, warmup_steps=0)
    rep = param_report(from_hf_config(getattr(transformers, cls)(**kw)), cfg.lora, parse_dtype(cfg.model.dtype),
                       optim)
    out = {"base_params": rep.base_params, "lora_params": rep.lora_params, "lora": rep.lora_memory,
           "qlora": rep.qlora_memory, "full": rep.full_memory}
    write_text_atomic(path, json.dumps(out) + "\n")
    return out


def _compute(job: dict, cache: Path) -> dict:
    """One row: the compile (recipe_compile.main) and the analytic counts (param_report). Runs in a worker."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import recipe_compile  # applies jaxtune's CPU defaults before jax is imported

    compiled = recipe_compile.main([str(REPO / job["recipe"]), job["target"], *job["overrides"]])

    from jaxtune.recipe import load_recipe

    cfg = load_recipe(REPO / job["recipe"], job["overrides"])
    rep = _analytic(job, cache)
    mem = rep[job["method"]]
    trainable = rep["base_params"] if job["method"] == "full" else rep["lora_params"]
    total = rep["base_params"] if job["method"] == "full" else rep["base_params"] + rep["lora_params"]

    tpu = job["target"] != "cpu"
    refused = compiled.get("does_not_fit")
    peak = None if refused else compiled["peak_estimate"]
    devices = math.prod(int(c) for c in job["target"].partition(":")[2].split("x")) if tpu else 1
    fixed = math.prod(v for v in cfg.mesh.values() if v != -1)
    mesh = {k: devices // fixed if v == -1 else v for k, v in cfg.mesh.items()}
    shards = math.prod(mesh.get(axis, 1) for axis in ("data", "fsdp", "expert"))
    gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
    return {
        "model": job["model"], "method": job["method"], "method_desc": job["method_desc"],
        "recipe": job["recipe"], "overrides": " ".join(job["overrides"]), "target": job["target"],
        "backend": "XLA:TPU" if tpu else "XLA:CPU", "device": compiled.get("device"), "devices": devices,
        "mesh": " x ".join(f"{k} {v}" for k, v in mesh.items()),
        "seq_len": cfg.data.seq_len, "batch": cfg.train.batch_size // cfg.optim.grad_accum_steps // shards,
        "grad_accum": cfg.optim.grad_accum_steps, "remat": cfg.model.remat, "attention": cfg.model.attention_impl,
        "base_params": rep["base_params"], "total_params": total, "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / total,
        "weights_bytes": mem["weights"], "grads_bytes": mem["grads"], "optimizer_bytes": mem["optimizer"],
        "wgo_bytes": mem["total"], "wgo_gib": gib(mem["total"]),
        "arguments_gib": gib(compiled.get("arguments")), "temporaries_gib": gib(compiled.get("temporaries")),
        "peak_gib": gib(peak), "peak_bytes": peak,
        "device_memory_gib": gib(CHIP_MEMORY[job["target"].split(":")[0]]) if tpu else None,
        "fits": (refused is None) if tpu else None, "does_not_fit": refused,
        "compile_s": round(compiled["compile_s"], 1), "label": LABEL, "note": NOTES["tpu" if tpu else "cpu"],
        "key": job["key"], "jaxtune_version": __version__,
    }


def _worker(jobs_file: str, cache: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        write_text_atomic(_row_file(Path(cache), job), json.dumps(_compute(job, Path(cache)), indent=1) + "\n")


def _row_file(cache: Path, job: dict) -> Path:
    return cache / f"row-{job['key']}.json"


# ------------------------------------------------------------------------------------------- in the driver


def _env() -> dict:
    """The worker's environment: CPU jax (a TPU target compiles through libtpu's compile-only client), one
    host device, and no JAX compilation cache (compile_s is a cold compile; the rows are the cache)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run(batch: list[dict], cache: Path, timeout: float) -> None:
    jobs_file = cache / f".jobs-{batch[0]['key']}.json"
    write_text_atomic(jobs_file, json.dumps(batch))
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(jobs_file), str(cache)], env=_env(),
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
    finally:
        jobs_file.unlink(missing_ok=True)
    missing = [j for j in batch if not _row_file(cache, j).is_file()]
    if proc.returncode or missing:
        job = missing[0] if missing else batch[0]
        raise RuntimeError(f"experiments/memory.py: {job['model']} {job['method']} on {job['target']} "
                           f"({job['recipe']} {' '.join(job['overrides'])}) failed, exit {proc.returncode}:\n"
                           + proc.stderr[-3000:])


def _ratios(rows: list[dict]) -> None:
    full = {(r["model"], r["target"]): r["peak_bytes"] for r in rows if r["method"] == "full"}
    for r in rows:
        base = full.get((r["model"], r["target"]))
        r["peak_vs_full"] = round(r["peak_bytes"] / base, 4) if base and r["peak_bytes"] else None


def rows(quick: bool = False, out: str | Path | None = None, timeout: float = 1800.0,
         log=None) -> list[dict]:
    """One row per (model shape, method, target), the schema above. Cached rows under `out/cache` are read,
    the rest compiled one subprocess at a time (quick: one subprocess for all). `log(msg)` hears progress."""
    cache = Path(out or DEFAULT_OUT) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs(quick) if not _row_file(cache, j).is_file()]
    for batch in [todo] if quick and todo else [[j] for j in todo]:
        start = time.perf_counter()
        _run(batch, cache, timeout)
        if log:
            log(f"{', '.join(j['model'] + ' ' + j['method'] + ' ' + j['target'] for j in batch)}: "
                f"{time.perf_counter() - start:.0f} s")
    done = {j["key"] for j in todo}
    result = []
    for j in jobs(quick):
        row = json.loads(_row_file(cache, j).read_text())
        result.append({**row, "cached": j["key"] not in done})
    _ratios(result)
    return result


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (one line per row)."""
    head = ["model", "method", "target", "seq", "batch", "remat", "params", "trainable", "trainable %",
            "weights+grads+AdamW", "peak / device", "vs full", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        where = ("XLA:CPU, 1 device" if r["target"] == "cpu" else f"XLA:TPU {r['target']}, "
                 + ("1 chip" if r["devices"] == 1 else f"{r['devices']} chips ({r['mesh']}), per chip"))
        peak = (f"does not fit: {r['does_not_fit']}" if r["does_not_fit"]
                else _bytes(r["peak_bytes"]) + (f" of {r['device_memory_gib']:.1f}" if r["device_memory_gib"] else ""))
        cells = [r["model"], r["method_desc"], where, r["seq_len"], r["batch"], r["remat"],
                 _count(r["total_params"]), _count(r["trainable_params"]), f"{r['trainable_pct']:.3g}%",
                 _bytes(r["wgo_bytes"]), peak,
                 "–" if r["peak_vs_full"] is None else f"{r['peak_vs_full']:.2f}×", f"{r['compile_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny shape on XLA:CPU only (seconds)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT/memory.json; rows cached in OUT/cache")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = rows(args.quick, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    write_text_atomic(Path(args.out) / "memory.json", json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\n{len(result)} rows, {LABEL}; {time.perf_counter() - start:.0f} s wall "
          f"({sum(not r['cached'] for r in result)} compiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
