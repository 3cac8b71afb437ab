"""Attention backends head to head: forward and forward+backward time of one attention call, the numbers
behind `jaxtune.model.attention.default_impl`.

    python scripts/bench_attention.py                       # stories260K training shape on this machine
    python scripts/bench_attention.py --shape 8,2048,32,8,64 --dtype bfloat16 --impls xla,blockwise,cudnn

Causal self-attention over full rows (one segment per row, as packing produces), GQA as given, gradients
with respect to q, k and v. Each time is the median of `--repeats` calls after a warm-up, with the process
CPU time alongside on CPU (a shared machine inflates wall time, not CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import utils as bu  # noqa: E402


def _torch_times(b, t, h, kh, d, dtype, repeats, base):
    """PyTorch's fused SDPA (its CPU flash kernel on CPU) forward and forward+backward, same shape."""
    import numpy as np
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    q = torch.randn(b, h, t, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(b, kh, t, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def both():
        (fwd().float() ** 2).sum().backward()

    out = []
    for f in (fwd, both):
        f()
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            if dev == "cuda":
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out.append((float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3))
    return [f"{out[0][0]:.2f}", f"{out[1][0]:.2f}", f"{out[1][1]:.1f}", f"{base / out[1][0]:.2f}×" if base else None]


def _median_ms(f, operands, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of `f(*operands)` over `repeats` calls (compiled beforehand)."""
    import jax
    import numpy as np

    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*operands))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="B,T,H,K,D (repeatable); default stories260K's 16,256,8,4,8")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--impls", default="xla,blockwise,cpu_flash", help="comma list (cpu_flash is CPU only)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch", action="store_true", help="also time PyTorch SDPA (is_causal, GQA) on the same shape")
    p.add_argument("--out", help="file to write the markdown table to")
    args = p.parse_args(argv)

    from jaxtune.runtime import apply_cpu_defaults

    apply_cpu_defaults()  # the `jaxtune` command's CPU process defaults, before jax is imported
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.model.attention import attention, prepare

    rows = []
    for spec in args.shape or ["16,256,8,4,8"]:
        b, t, h, kh, d = (int(x) for x in spec.split(","))
        rng = np.random.default_rng(0)
        dt = jnp.dtype(args.dtype)
        q = jnp.asarray(rng.standard_normal((b, t, h, d)), dt)
        k, v = (jnp.asarray(rng.standard_normal((b, t, kh, d)), dt) for _ in range(2))
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        seg = jnp.ones((b, t), jnp.int32)
        base = None
        for impl in args.impls.split(","):
            def fwd(q, k, v, impl=impl):
                return attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None, impl=impl)

            grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2)))
            fwd = jax.jit(fwd)
            try:
                prepare(impl)  # builds cpu_flash before the first trace, as a model does
                t0 = time.perf_counter()
                jax.block_until_ready(grad(q, k, v))
                compile_s = time.perf_counter() - t0
                jax.block_until_ready(fwd(q, k, v))
            except Exception as e:  # a backend this platform or shape lacks: report it, keep measuring the rest
                rows.append([spec, impl, None, None, None, None, f"{type(e).__name__}: {str(e)[:120]}"])
                continue
            out = {name: _median_ms(f, (q, k, v), args.repeats) for name, f in (("fwd", fwd), ("fwd+bwd", grad))}
            base = base or out["fwd+bwd"][0]
            rows.append([spec, impl, f"{out['fwd'][0]:.2f}", f"{out['fwd+bwd'][0]:.2f}",
                         f"{out['fwd+bwd'][1]:.1f}", f"{base / out['fwd+bwd'][0]:.2f}×", f"compile {compile_s:.1f} s"])
        if args.torch:
            rows.append([spec, "torch sdpa", *_torch_times(b, t, h, kh, d, args.dtype, args.repeats, base), ""])
    text = (f"{args.dtype}, {jax.devices()[0].device_kind}, median of {args.repeats}\n\n"
            + bu.markdown_table(["B,T,H,K,D", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd CPU ms", "speed-up vs first",
                                 "note"], rows)
            + f"\n\nMachine: {bu.machine_markdown(bu.machine())}\n\n"
            f"Command: `{bu.command('bench_attention.py', argv)}`\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
