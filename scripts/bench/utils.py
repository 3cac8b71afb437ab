"""Shared by `scripts/bench_*.py`: model presets, synthetic batches, timing summaries, peak memory, the
software/machine record, markdown tables, the options and outputs every benchmark has, and the worker
processes each side runs in.

Imports only the standard library and numpy (`jaxtune.runtime` is standard library too), so a benchmark's
PyTorch side never loads JAX (and the other way round): each side runs in its own process and its peak memory
is its own.

Process defaults: a worker marked `@jaxtune_side` starts with `jaxtune.runtime.apply_cpu_defaults()` (the
XLA:CPU flag and the malloc setting, as the `jaxtune` command does), applied by `dispatch_worker` before the
worker imports jax (`jax_env` turns `--plain-xla` into the flag's opt-out for it). A PyTorch-side worker
starts with the malloc setting alone (`tune_malloc`), as every worker did while these helpers were part of
the package (importing it applied both), which is how the PyTorch workers' CPU figures in docs/benchmarks.md
were measured. `JAXTUNE_CPU_MALLOC=0` turns it off on both sides.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxtune import runtime  # standard library only
from jaxtune.runtime import FAST_CPU_XLA_FLAGS, MALLOC_OPT_OUT_VAR, OPT_OUT_VAR

# Llama-architecture shapes (transformers `LlamaConfig` keyword arguments); weights are random.
PRESETS: dict[str, dict] = {
    # stories260K (the real asset's config)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=8, tie_word_embeddings=True, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=512),
    # SmolLM-135M
    "small": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048),
    # Llama-3.2-1B (without its llama3 rope scaling, which costs nothing at these lengths)
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    # Llama-3-8B
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
}

# Per preset and platform: the run a benchmark does unless flags say otherwise. CPU runs stay short.
RUN_DEFAULTS: dict[tuple[str, str], dict] = {
    ("tiny", "cpu"): dict(batch=16, seq=256, dtype="float32", steps=15, warmup=3),
    ("small", "cpu"): dict(batch=2, seq=256, dtype="float32", steps=3, warmup=1),
    ("1b", "cpu"): dict(batch=1, seq=128, dtype="float32", steps=2, warmup=1),
    ("8b", "cpu"): dict(batch=1, seq=128, dtype="bfloat16", steps=1, warmup=1),
    ("tiny", "gpu"): dict(batch=16, seq=256, dtype="float32", steps=20, warmup=3),
    ("small", "gpu"): dict(batch=16, seq=1024, dtype="bfloat16", steps=10, warmup=3),
    ("1b", "gpu"): dict(batch=4, seq=2048, dtype="bfloat16", steps=8, warmup=3),
    ("8b", "gpu"): dict(batch=1, seq=4096, dtype="bfloat16", steps=5, warmup=2),
}


def jax_env(platform: str, fast_cpu_flags: bool = True) -> dict:
    """Environment additions for a jaxtune-side worker. On CPU, XLA_FLAGS with `FAST_CPU_XLA_FLAGS` (jaxtune's
    default there, `jaxtune/runtime.py`), or without it and with that default turned off (`--plain-xla`: the
    worker's `apply_cpu_defaults()` then leaves the flag out and still sets malloc). This process's
    XLA_FLAGS, which a worker inherits, may hold the flag already (from the caller's environment), so it is
    taken out first. A `JAXTUNE_CPU_MALLOC` setting is repeated so that the table's note shows it. Nothing
    on GPU (the flag is CPU-only)."""
    if platform != "cpu":
        return {}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != FAST_CPU_XLA_FLAGS]
    malloc = {MALLOC_OPT_OUT_VAR: os.environ[MALLOC_OPT_OUT_VAR]} if MALLOC_OPT_OUT_VAR in os.environ else {}
    if fast_cpu_flags:
        return {"XLA_FLAGS": " ".join([*flags, FAST_CPU_XLA_FLAGS]), **malloc}
    return {"XLA_FLAGS": " ".join(flags), OPT_OUT_VAR: "0", **malloc}


def torch_env() -> dict:
    """Environment additions for a PyTorch worker: OpenMP threads that sleep instead of spinning at
    barriers (on a shared CPU spinning made TRL steps several times slower at random; on a quiet one it
    changed nothing measurable: docs/benchmarks.md). A `JAXTUNE_CPU_MALLOC` setting is repeated so that the
    table's note shows it."""
    malloc = {MALLOC_OPT_OUT_VAR: os.environ[MALLOC_OPT_OUT_VAR]} if MALLOC_OPT_OUT_VAR in os.environ else {}
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **malloc}


def env_note(env: dict) -> str:
    return ", ".join(f"{k}={v}" if v else f'{k}=""' for k, v in env.items()) or "none"


def hf_config_kwargs(preset: str) -> dict:
    """`LlamaConfig` keywords for `preset` (transformers 5 reads `rope_theta` through `rope_parameters`)."""
    kw = dict(PRESETS[preset])
    theta = kw.pop("rope_theta")
    return dict(kw, rope_parameters=dict(rope_type="default", rope_theta=theta), hidden_act="silu",
                attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """One full row per example (what packing produces, one document per row): random tokens, next-token
    targets, every position in the loss. Both sides of a benchmark train on exactly these arrays."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq + 1), dtype=np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones, "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def timed_steps(step, warmup: int, steps: int) -> tuple[list[float], list[float], float]:
    """Run `step(i) -> loss` (a float, so the step has finished) 1 + warmup + steps times; returns the timed
    steps' seconds (after the first step and the warm-up), every loss, and the first step's seconds."""
    times, losses, first_s = [], [], 0.0
    for i in range(1 + warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        dt = time.perf_counter() - t0
        if i == 0:
            first_s = dt
        elif i > warmup:
            times.append(dt)
    return times, losses, first_s


def summarize(step_seconds: list[float], tokens_per_step: float) -> dict:
    """Tokens/s median, min and max over timed steps."""
    rates = [tokens_per_step / s for s in step_seconds]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "step_s_median": statistics.median(step_seconds), "timed_steps": len(step_seconds)}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions(names=("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "trl", "datasets",
                    "numpy")) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_memory_bytes() -> int | None:
    """Total memory of GPU 0 from nvidia-smi (read without starting any framework)."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 and out.stdout.strip() else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What ran the benchmark: date, CPU, core count, load, GPU, Python and package versions."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "load_1min": load, "gpu": gpu_name(),
            "python": platform.python_version(), "versions": versions()}


def machine_markdown(m: dict) -> str:
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items() if x)
    gpu = f"; GPU: {m['gpu']}" if m.get("gpu") else ""
    load = f"; 1-min load at start {m['load_1min']:.1f}" if m.get("load_1min") is not None else ""
    return f"{m['date']}; CPU: {m['cpu']} ({m['cores']} cores){load}{gpu}; Python {m['python']}; {v}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "–"
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_bytes(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale or unit == "MiB":
            return f"{n / scale:.2f} {unit}"
    return str(n)


def torch_llama(preset: str, dtype, device, **config):
    """transformers `LlamaForCausalLM` of `preset` with random weights created in `dtype` on `device`
    (`config`: more `LlamaConfig` keywords, e.g. `attn_implementation`). PyTorch side only."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**hf_config_kwargs(preset), **config)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)


def run_worker(argv: list[str], *, timeout: float, env: dict | None = None, python: str | None = None) -> dict:
    """Run `python argv... --result FILE` in a fresh process; its JSON result, or `{"error": ...}` with the
    tail of its output when it fails or times out (a benchmark reports the failure and goes on)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [python or sys.executable, *argv, "--result", str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-2000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-2000:]
            return {"error": f"timed out after {timeout:.0f} s", "log": str(tail)}
        if result.exists():
            out = json.loads(result.read_text())
            out.setdefault("log", (proc.stderr or "")[-1500:])
            return out
        return {"error": f"exit code {proc.returncode}", "log": ((proc.stdout or "") + (proc.stderr or ""))[-3000:]}


def write_result(path: str | None, data: dict) -> None:
    """A worker's last act: its measurements as JSON for the parent."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str))


# A benchmark runs each side by calling itself as a worker: `script --worker NAME --settings JSON --result FILE`.
def add_run_args(parser: argparse.ArgumentParser, workers, *, timeout: float, out: str) -> None:
    """The options every two-sided benchmark has: `--plain-xla`, `--timeout` (per worker, seconds; default
    `timeout`), `--out` (directory for `out`), and the hidden options of a worker process (`workers`: the
    worker names, or the dict `dispatch_worker` takes)."""
    parser.add_argument("--plain-xla", action="store_true",
                        help="CPU: run jaxtune without its XLA:CPU flag (jaxtune.runtime.FAST_CPU_XLA_FLAGS)")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per worker process")
    parser.add_argument("--out", help=f"directory for {out}")
    parser.add_argument("--worker", choices=tuple(workers), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def jaxtune_side(worker):
    """Marks a worker that imports jax: `dispatch_worker` applies jaxtune's CPU process defaults before it runs."""
    worker.jaxtune_side = True
    return worker


def dispatch_worker(args: argparse.Namespace, workers: dict) -> bool:
    """In a worker process (`--worker NAME`): apply the process defaults of its side (module docstring), run
    `workers[NAME](settings)` and write its result; True. False in the parent (no `--worker`)."""
    if not args.worker:
        return False
    worker = workers[args.worker]
    if getattr(worker, "jaxtune_side", False):
        runtime.apply_cpu_defaults()  # before the worker imports jax; each default keeps its opt-out
    else:
        runtime.tune_malloc()
    write_result(args.result, worker(json.loads(args.settings)))
    return True


def spawn_worker(script: str, worker: str, settings: dict, *, timeout: float, env: dict | None = None,
                 python: str | None = None, label: str | None = None) -> dict:
    """`run_worker` on `script --worker WORKER --settings JSON` (the parent's side of `dispatch_worker`); a
    failure's error and log go to stderr under `[label]` (default: the worker's name)."""
    r = run_worker([script, "--worker", worker, "--settings", json.dumps(settings)], timeout=timeout, env=env,
                   python=python)
    if "error" in r:
        print(f"[{label or worker}] {r['error']}\n{r.get('log', '')}", file=sys.stderr)
    return r


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran `script` (for a report's `Command:` line)."""
    return f"python scripts/{script} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()


def write_outputs(out: str | None, stem: str, text: str, data: dict) -> None:
    """A report as `out/stem.md` and its raw results as `out/stem.json` (nothing without `out`)."""
    if not out:
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stem}.md").write_text(text)
    (path / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))


def peak_bf16_flops(device_kind: str | None) -> float | None:
    from jaxtune.train.metrics import PEAK_BF16_FLOPS

    for prefix, flops in PEAK_BF16_FLOPS.items():
        if device_kind and device_kind.startswith(prefix):
            return flops
    return None
