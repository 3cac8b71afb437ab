"""One attention interface: `attention(...)` runs the backend `impl` names, `auto` picking one by platform,
shape and what is asked of it (`default_impl`); `prepare(impl)` builds what a backend needs before anything
traces.

The backends are the names in `model.config.ATTENTION_IMPLS`, one module each here, every one exposing
`attention(q, k, v, *, q_idx, k_idx, q_seg, k_seg, window, sliding, scale, softcap)` and applying
`mask.visibility`; `xla` (dense) is the reference. Scores are computed as HF eager attention does: q·k times
`scale` (None: 1/sqrt(head_dim); Gemma's query_pre_attn_scalar**-0.5, Granite's attention_multiplier), then,
when `softcap` is set, `softcap * tanh(scores / softcap)`, then the mask, then softmax in fp32. Both are static
Python floats. Every backend but `cudnn` soft-caps (cuDNN cannot: it refuses a `softcap`). Rows that see no key
at all (padding queries) are garbage in every backend, as in the reference, and differ between them; nothing
downstream reads them.
"""

from __future__ import annotations

import importlib
import math

import jax
from jax.sharding import AxisType

from jaxtune.model.attention import blockwise, cpu_flash, cudnn, mask, splash, xla  # noqa: F401
from jaxtune.model.attention.mask import NEG_INF, visibility  # noqa: F401  (the rule is part of the interface)
from jaxtune.model.config import ATTENTION_IMPLS

Array = jax.Array
BACKENDS = {impl: importlib.import_module(f"{__name__}.{impl}") for impl in ATTENTION_IMPLS if impl != "auto"}


def platform() -> str:
    """The platform of arrays on no mesh: this process's default backend."""
    return jax.default_backend()


def default_impl(q: Array, k: Array, softcap: float | None = None) -> str:
    """Backend for `impl="auto"`, by platform and shape (the choices follow docs/benchmarks.md). The platform is
    that of the mesh `q` is laid out on, so a compile for a TPU topology from a CPU host picks splash.

    Decode and cached prefill (query length != key length) stay dense: one query row has nothing to skip.
    `cpu_flash` only on one device (XLA partitions a custom call only by replicating it), once built.
    Never `cudnn` with a `softcap`, which cuDNN cannot apply, nor on a GPU older than Ampere."""
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    if t != s:
        return "xla"
    kind = mask.operand_platform(q) or platform()
    if kind == "tpu" and t % splash.BLOCK == 0:
        return "splash"
    if (kind == "gpu" and softcap is None and q.dtype in cudnn.DTYPES and d % 8 == 0 and d <= 128
            and cudnn.supported_gpu()):
        return "cudnn"
    if kind == "cpu" and jax.device_count() == 1 and cpu_flash.supports(q, k) and cpu_flash.available():
        return "cpu_flash"
    return "blockwise"


def prepare(impl: str) -> None:
    """Build the `cpu_flash` kernel where `impl` may run it (named, or `auto` on one CPU device), so that it
    is built before the first trace and never inside one. Naming it where it cannot run raises here."""
    if impl == "auto" and platform() == "cpu" and jax.device_count() == 1:
        cpu_flash.ensure_built()
    elif impl == "cpu_flash":
        if platform() != "cpu":
            raise ValueError(f"attention_impl='cpu_flash' is a CPU kernel; this process runs on {platform()}")
        if not cpu_flash.ensure_built():
            raise cpu_flash.KernelUnavailable("attention_impl='cpu_flash': the kernel cannot be built on this "
                                              "machine (see the warning above)")


def _mesh_devices(x: Array) -> int:
    """Devices `x` is laid out over (shard_map's manual axes excepted), from its abstract sharding."""
    mesh = jax.typeof(x).sharding.mesh
    return math.prod(n for n, kind in zip(mesh.axis_sizes, mesh.axis_types) if kind != AxisType.Manual)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, impl: str = "auto", scale: float | None = None,
              softcap: float | None = None) -> Array:
    """Attention of `q[B,T,H,D]` over `k,v[B,S,K,D]` (GQA by grouping) with backend `impl`; scores times
    `scale` (None: 1/sqrt(head_dim)), soft-capped at `softcap` when set."""
    scale = None if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention softcap={softcap}: expected a positive cap, or None for no soft-capping")
    if impl == "auto":
        impl = default_impl(q, k, softcap)
    elif impl == "cpu_flash" and (n := max(map(_mesh_devices, (q, k, v)))) > 1:
        raise ValueError(f"attention_impl='cpu_flash' on a {n}-device mesh: XLA partitions the kernel's custom "
                         "call only by replicating it, so every device would compute the whole batch; use "
                         "'auto' (cpu_flash on one device, blockwise otherwise) or 'blockwise'")
    if impl not in BACKENDS:
        raise ValueError(f"attention_impl={impl!r} is not available; expected one of {ATTENTION_IMPLS}")
    return BACKENDS[impl].attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                                    sliding=sliding, scale=scale, softcap=softcap)
