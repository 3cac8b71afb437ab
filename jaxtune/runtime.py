"""Process defaults for running XLA on a CPU: `apply_cpu_defaults()`, called by the `jaxtune` command before
anything imports jax, and by library users, tests and benchmarks that want the same process.

Two, each with its own opt-out:
- an XLA:CPU flag appended to `XLA_FLAGS` (`JAXTUNE_XLA_CPU_FLAGS=0`). It only changes XLA's CPU backend, so
  it is harmless on GPU and TPU;
- glibc malloc settings that keep XLA:CPU's per-execution scratch memory mapped between steps
  (`JAXTUNE_CPU_MALLOC=0`), only where jax will run on the CPU (see `tune_malloc`).

Imports only the standard library (never jax: both must be in place before jax starts a backend).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from collections.abc import Mapping, MutableMapping

# Matmuls through YNNPACK (XLA's default list of YNN fusion types is empty). Only dots: with "reduce" too,
# YNN grows multi-dot subgraphs (e.g. a layer's gate and up input gradients, their LoRA terms and the adds, as
# one fusion) that use a second core poorly; single-matmul fusions ran faster on each training benchmark
# measured (the figures: docs/benchmarks.md). The parity tests pass with it; the benchmarks use it too
# (`scripts/bench/utils.py`).
FAST_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot"
_FLAG_NAME = FAST_CPU_XLA_FLAGS.split("=")[0].lstrip("-")
OPT_OUT_VAR = "JAXTUNE_XLA_CPU_FLAGS"

# jaxlib (major, minor) versions known to have the flag, [low, high). An unknown flag in XLA_FLAGS makes XLA
# abort the process, so this stays narrow: widen it only after checking that a new version knows the flag.
KNOWN_GOOD_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def _known_good(version: str | None) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        return False
    low, high = KNOWN_GOOD_JAXLIB
    return low <= (int(m[1]), int(m[2])) < high


def _opted_out_or_late(environ: Mapping[str, str], modules: Mapping, opt_out_var: str) -> bool:
    """A default is skipped when its variable is "0", or once jax is imported (its backend may have read
    XLA_FLAGS, its threads may have malloc arenas)."""
    return environ.get(opt_out_var, "").strip() == "0" or "jax" in modules or "jaxlib" in modules


def apply_default_cpu_flags(environ: MutableMapping[str, str] | None = None, modules: Mapping | None = None,
                            jaxlib_version: str | None = None) -> bool:
    """Append `FAST_CPU_XLA_FLAGS` to `environ["XLA_FLAGS"]` (default `os.environ`) unless the user opted out
    (`JAXTUNE_XLA_CPU_FLAGS=0`), XLA_FLAGS already sets the flag, jax is already imported (`modules`, default
    `sys.modules`: its backend may have read XLA_FLAGS already), or the jaxlib version (default: the
    installed one, read without importing it) is not known to have the flag. True when it appended."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    flags = environ.get("XLA_FLAGS", "")
    if _opted_out_or_late(environ, modules, OPT_OUT_VAR) or _FLAG_NAME in flags:
        return False
    if not _known_good(jaxlib_version if jaxlib_version is not None else _jaxlib_version()):
        return False
    environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_XLA_FLAGS}".strip()
    return True


# ------------------------------------------------------------------------------------------------ malloc

MALLOC_OPT_OUT_VAR = "JAXTUNE_CPU_MALLOC"
# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# Free memory at the top of the heap is given back to the OS only above this (mallopt takes an int).
TRIM_THRESHOLD = 2**31 - 1
# Module names of jax's accelerator plugins (PJRT plugins live in the `jax_plugins` namespace package).
ACCELERATOR_MODULES = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def _cpu_only(environ: Mapping[str, str]) -> bool:
    """Will jax run on the CPU? `JAX_PLATFORMS` decides when set; otherwise: no accelerator plugin installed."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc(environ: Mapping[str, str] | None = None, modules: Mapping | None = None, libc=None) -> bool:
    """Keep XLA:CPU's scratch memory mapped between executions: one malloc arena, no mmap'd chunks, and a
    2 GiB trim threshold (mallopt(3)).

    Why: XLA:CPU mallocs each execution's temporaries as one block on one of its worker threads. glibc
    serves a block that large from a fresh mmap and unmaps it on free, so every step faults in all of its
    pages again, in kernel time that a small model's step spends a large share on. With one arena and no
    mmap the block comes from the heap and is reused. The costs: memory freed below the top of the heap is
    not given back to the OS, and threads share one arena, which makes XLA's (multi-threaded) compilation
    slower (docs/benchmarks.md has the figures). So this applies only where jax will run on the CPU
    (`JAX_PLATFORMS`, else no accelerator plugin installed), on glibc, before jax is imported (its threads
    would already have arenas), unless `JAXTUNE_CPU_MALLOC=0`. True when set."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if _opted_out_or_late(environ, modules, MALLOC_OPT_OUT_VAR) or not _cpu_only(environ):
        return False
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def apply_cpu_defaults() -> dict[str, bool]:
    """Apply both defaults (each keeps its own opt-out and its too-late check: call before importing jax).
    Returns which were applied, e.g. `{"xla_flags": True, "malloc": True}`."""
    return {"xla_flags": apply_default_cpu_flags(), "malloc": tune_malloc()}
