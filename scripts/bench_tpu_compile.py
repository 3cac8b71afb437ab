"""Every TPU recipe's real train step compiled by XLA:TPU for its slice, on a host without a TPU.

    python scripts/bench_tpu_compile.py                      # all cases, a table; exit 1 if one does not fit
    python scripts/bench_tpu_compile.py --only llama3-70b    # cases whose recipe name contains this
    python scripts/bench_tpu_compile.py --cpu                # the fake-CPU-device stand-in (an estimate)

libtpu (`pip install -e '.[tpu-compile]'`) gives a compile-only TPU client: `jaxtune.train.plan.topology_devices`
returns the chips of a topology such as `v5p:2x4x4`, the recipe's mesh is laid over them and its train step
(LoRA or full, splash attention through Mosaic, remat, scanned layers) is lowered on abstract weights and
compiled by XLA:TPU. Its `memory_analysis()` is the compiler's own per-chip figure (arguments + outputs −
aliased + temporaries), checked against the chip's HBM; `cost_analysis()` FLOPs count a while loop's body once
(one layer, one micro-batch), so the table also gives the model FLOPs of a whole step per chip.

Without libtpu (or with `--cpu`) the same step compiles on as many fake CPU devices as the slice has chips,
labelled an estimate: XLA:CPU keeps fp32 copies of bf16 weights, so it over-counts. Each case runs in its own
process (the device count is fixed per process).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench import utils as bu  # noqa: E402
from bench.recipes import ARCHITECTURES, DEVICE_MEMORY, TPU_TOPOLOGIES  # noqa: E402

# Full fine-tuning shards weights, gradients and Adam's moments over every chip (replicated, 1B of fp32 weights and
# their optimizer state alone fill a v5e chip).
FULL = ["train.mode=full", "lora=null", "mesh={fsdp: 8}"]
# (recipe, training mode, overrides): each TPU recipe as written, and full fine-tuning where the slice holds it.
CASES = [
    ("tpu-v5e-8-lora.yaml", "LoRA", []),
    ("gemma3-1b-lora-v5e-8.yaml", "LoRA", []),
    ("gemma3-1b-lora-v5e-8.yaml", "full", FULL),
    ("qwen3-30b-a3b-lora.yaml", "LoRA", []),
    ("llama3-70b-lora-v5p-64.yaml", "LoRA", []),
]


def chips(topology: str) -> int:
    """Chips in a topology name such as `v5p:2x4x4`."""
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


@bu.jaxtune_side
def compile_worker(s: dict) -> dict:
    import jax
    import transformers

    from jaxtune.hf.families import from_hf_config
    from jaxtune.recipe import load_recipe
    from jaxtune.train.metrics import train_flops_per_token
    from jaxtune.train.plan import build_mesh, lower_train_step, topology_devices

    cfg = load_recipe(REPO / "configs" / s["recipe"], s["overrides"])
    cls, kw = ARCHITECTURES[s["recipe"]]
    model_cfg = from_hf_config(getattr(transformers, cls)(**kw))
    devices = jax.devices() if s["cpu"] else topology_devices(s["topology"])
    mesh = build_mesh(cfg, devices)
    start = time.perf_counter()
    try:
        plan, _ = lower_train_step(cfg, model_cfg, mesh)
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"does_not_fit": str(e).splitlines()[0], "compile_seconds": time.perf_counter() - start,
                "mesh": {k: v for k, v in mesh.shape.items() if v > 1}}
    seconds = time.perf_counter() - start
    tokens = math.prod(plan.batch_shape)
    per_token = train_flops_per_token(plan.model_config, cfg.data.seq_len, plan.n_params, plan.n_trainable)
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": mesh.size,
            "mesh": {k: v for k, v in mesh.shape.items() if v > 1}, "compile_seconds": seconds,
            "memory": plan.memory, "xla_flops": plan.flops, "model_flops": per_token * tokens / mesh.size,
            "n_params": plan.n_params, "n_trainable": plan.n_trainable, "batch_shape": list(plan.batch_shape),
            "attention": "splash" if devices[0].platform == "tpu" else "xla"}


WORKERS = {"compile": compile_worker}


def run_case(recipe: str, mode: str, overrides: list[str], *, cpu: bool, timeout: float) -> dict:
    topology = TPU_TOPOLOGIES[recipe]
    env = {"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    if cpu:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={chips(topology)}"
        overrides = overrides + ["model.attention_impl=xla"]  # dense compiles fastest on CPU; same shapes
    settings = {"recipe": recipe, "overrides": overrides, "topology": topology, "cpu": cpu}
    r = bu.spawn_worker(__file__, "compile", settings, timeout=timeout, env=env, label=f"{recipe} {mode}")
    return {**r, "recipe": recipe, "mode": mode, "topology": topology, "hbm": DEVICE_MEMORY[recipe]}


def fits(r: dict) -> bool:
    return "error" not in r and "does_not_fit" not in r and r["memory"]["peak_estimate"] <= r["hbm"]


def report(results: list[dict], cpu: bool, argv) -> str:
    source = ("XLA:CPU on fake devices, an estimate (fp32 copies of bf16 weights over-count)" if cpu else
              "XLA:TPU's own memory_analysis() (libtpu compile-only client)")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["recipe"], r["mode"], r["topology"], "–", "–", "–", "–", "–", "failed: " + r["error"]])
            continue
        if "does_not_fit" in r:
            rows.append([r["recipe"].removesuffix(".yaml"), r["mode"], r["topology"],
                         ", ".join(f"{k} {v}" for k, v in r["mesh"].items()), "–", f"{r['hbm'] / 2**30:.1f} GiB", "–",
                         "–", f"DOES NOT FIT: {r['does_not_fit']}"])
            continue
        m = r["memory"]
        rows.append([r["recipe"].removesuffix(".yaml"), r["mode"], r["topology"],
                     ", ".join(f"{k} {v}" for k, v in r["mesh"].items()),
                     bu.fmt_bytes(m["peak_estimate"]), f"{r['hbm'] / 2**30:.1f} GiB",
                     f"{r['xla_flops']:.3g}" if r.get("xla_flops") else "–", f"{r['model_flops']:.3g}",
                     ("fits" if fits(r) else "DOES NOT FIT") + f" ({r['compile_seconds']:.0f} s compile)"])
    table = bu.markdown_table(["recipe", "mode", "slice", "mesh", "peak per chip", "HBM per chip",
                               "XLA FLOPs/chip (loop bodies once)", "model FLOPs/chip/step", "result"], rows)
    return f"Per-chip memory: {source}.\n\n{table}\n\nCommand: {bu.command('bench_tpu_compile.py', argv)}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run the cases whose recipe file name contains this")
    p.add_argument("--cpu", action="store_true", help="compile on fake CPU devices (an estimate) instead of XLA:TPU")
    bu.add_run_args(p, WORKERS, timeout=900, out="tpu_compile.{md,json}")
    args = p.parse_args(argv)
    if bu.dispatch_worker(args, WORKERS):
        return 0
    cpu = args.cpu or importlib.util.find_spec("libtpu") is None
    if cpu and not args.cpu:
        print("libtpu is not installed (pip install -e '.[tpu-compile]'): compiling on fake CPU devices instead, "
              "an estimate", file=sys.stderr)
    cases = [c for c in CASES if not args.only or args.only in c[0]]
    if not cases:
        print(f"no case matches --only {args.only}; recipes: {sorted({c[0] for c in CASES})}", file=sys.stderr)
        return 2
    results = []
    for recipe, mode, overrides in cases:
        r = run_case(recipe, mode, overrides, cpu=cpu, timeout=args.timeout)
        status = r.get("error") or r.get("does_not_fit") or f"{bu.fmt_bytes(r['memory']['peak_estimate'])} per chip"
        print(f"[{recipe} {mode} on {r['topology']}] {status}", flush=True)
        results.append(r)
    text = report(results, cpu, argv)
    print("\n" + text)
    bu.write_outputs(args.out, "tpu_compile", text, {"machine": bu.machine(), "results": results})
    bad = [f"{r['recipe']} ({r['mode']})" for r in results if not fits(r)]
    if bad:
        print(f"error: {', '.join(bad)}: failed to compile or does not fit its chip's HBM", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
