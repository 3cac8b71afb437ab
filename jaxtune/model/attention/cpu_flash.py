"""`cpu_flash`: a fused flash-attention kernel for XLA:CPU (`cpu_flash.cc`), called through the XLA FFI.

XLA:CPU runs attention as separate passes (matmuls contracting over head_dim, then mask, exp, sum), each far
below peak when head_dim is small; the C++ kernel keeps a 64-key tile in registers across all of them, for
the forward and for a recomputing backward.

`ensure_built()` compiles it with the system C++ compiler against the FFI headers that ship with jaxlib and
caches it under `$JAXTUNE_CACHE_DIR/kernels` (`jaxtune/cache.py`), keyed by the source, jaxlib version,
compiler, flags and CPU. The model calls it (through `attention.prepare`) before anything traces; tracing
never builds. Where it cannot be built `auto` uses `blockwise` (with one warning) and naming `cpu_flash` raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.cache import cache_dir
from jaxtune.model.attention.mask import score_scale

Array = jax.Array
log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_flash.cc")
HEAD_DIMS = (8, 16, 32, 64, 96, 128, 256)  # JAXTUNE_HEAD_DIMS in the source; others are zero-padded up
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FWD, _BWD = "jaxtune_cpu_flash_fwd", "jaxtune_cpu_flash_bwd"


class KernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded on this machine."""


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _key(cxx: str) -> str:
    parts = [SOURCE.read_bytes(), importlib.metadata.version("jaxlib").encode(), cxx.encode(), " ".join(FLAGS).encode(),
             _cpu_id().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def library_path() -> Path:
    """The built shared library, compiled first if this machine has none; prints one line while it compiles.
    The build goes to a temporary file renamed into place, so concurrent builders cannot clash."""
    cxx = _compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (set CXX or install g++)")
    out = cache_dir() / "kernels" / f"cpu_flash-{_key(cxx)}.so"
    if out.exists():
        return out
    print(f"jaxtune: building the cpu_flash attention kernel with {cxx} (once per machine)", file=sys.stderr,
          flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise KernelUnavailable(f"cannot run the C++ compiler {cxx!r}: {e}") from e
        if proc.returncode != 0:
            raise KernelUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> None:
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.JaxtuneFlashFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.JaxtuneFlashBwd), platform="cpu")


_ready: bool | None = None  # None until ensure_built() has run
_lock = threading.Lock()


def ensure_built() -> bool:
    """Build (when this machine has no build) and register the kernel, once per process; False, with one
    warning, where it cannot be built. Call it before tracing: the kernel is never built inside a trace."""
    global _ready
    with _lock:
        if _ready is None:
            try:
                _load(library_path())
                _ready = True
            except (KernelUnavailable, OSError) as e:
                log.warning("cpu_flash attention unavailable, using blockwise: %s", e)
                _ready = False
    return _ready


def available() -> bool:
    """Whether `ensure_built()` has built and registered the kernel. Never builds: safe while tracing."""
    return bool(_ready)


def supports(q: Array, k: Array) -> bool:
    return q.shape[-1] <= HEAD_DIMS[-1] and q.shape[2] % k.shape[2] == 0


def _kernel_dim(d: int) -> int:
    """The specialised head dim a `d`-dim head runs as (zero-padded: zeros change no score or output)."""
    return next(n for n in HEAD_DIMS if n >= d)


def _call(name, results, *args, window, scale, softcap):
    fn = jax.ffi.ffi_call(name, results, vmap_method="sequential")
    return fn(*args, window=np.int64(window), scale=np.float32(scale), softcap=np.float32(softcap))


@functools.lru_cache(maxsize=None)
def _flash(window: int, scale: float, softcap: float):
    """custom_vjp pair of FFI calls for one static (window, scale, softcap); the kernel reads window -1 as
    none and softcap 0 as no cap."""
    attrs = dict(window=window, scale=scale, softcap=softcap)

    def forward(q, k, v, *mask):
        b, t, h, _ = q.shape
        results = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
        return _call(_FWD, results, q, k, v, *mask, **attrs)

    @jax.custom_vjp
    def f(q, k, v, *mask):
        return forward(q, k, v, *mask)[0]

    def fwd(q, k, v, *mask):
        out, lse = forward(q, k, v, *mask)
        return out, (q, k, v, mask, out, lse)

    def bwd(res, dout):
        q, k, v, mask, out, lse = res
        results = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
        dq, dk, dv = _call(_BWD, results, q, k, v, *mask, out, lse, dout.astype(jnp.float32), **attrs)
        return (dq, dk, dv) + (None,) * len(mask)

    f.defvjp(fwd, bwd)
    return f


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None) -> Array:
    """Attention of `q[B,T,H,D]` over `k,v[B,S,K,D]` under the visibility rule (`mask.py`), in fp32."""
    if not supports(q, k):
        raise ValueError(f"cpu_flash supports head_dim <= {HEAD_DIMS[-1]} and query heads divisible by KV "
                         f"heads; got q {q.shape}, k {k.shape}")
    if not available():
        raise KernelUnavailable("cpu_flash attention is unavailable on this machine (see the warning above)"
                                if _ready is False else "cpu_flash attention is not built: call ensure_built() "
                                "(models do, through attention.prepare) before tracing")
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    d = q.shape[-1]
    pad = lambda x: jnp.pad(f32(x), [(0, 0)] * 3 + [(0, _kernel_dim(d) - d)])  # noqa: E731
    mask = (i32(q_idx), i32(k_idx), i32(q_seg), i32(k_seg), i32(sliding).reshape(1))
    flash = _flash(-1 if window is None else int(window), score_scale(d, scale), 0.0 if softcap is None else softcap)
    out = flash(pad(q), pad(k), pad(v), *mask)
    return out[..., :d].astype(q.dtype)
