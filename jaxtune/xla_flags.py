"""Default XLA:CPU flags, appended to `XLA_FLAGS` when `jaxtune` is imported before jax.

Imports only the standard library (never jax: the flags must be in the environment before jax starts a
backend). The flags only change XLA's CPU backend, so they are harmless on GPU and TPU. Opt out with
`JAXTUNE_XLA_CPU_FLAGS=0`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import Mapping, MutableMapping

# YNNPACK also for reduce fusions, which removes most of the transposes XLA otherwise inserts around the small
# matmuls (the stories260K train step with jaxlib 0.10.2: 1.2–1.6× before the fused CPU attention kernel;
# with it, "dot,reduce" used 8–20% less CPU per step than "dot,eltwise,reduce", whose elementwise fusions
# materialise every broadcast constant). The parity tests pass with it; the benchmarks use it too
# (`bench_utils.FAST_CPU_XLA_FLAGS`).
FAST_CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
_FLAG_NAME = FAST_CPU_XLA_FLAGS.split("=")[0].lstrip("-")
OPT_OUT_VAR = "JAXTUNE_XLA_CPU_FLAGS"

# jaxlib (major, minor) versions known to have the flag, [low, high). An unknown flag in XLA_FLAGS makes XLA
# abort the process, so this stays narrow: measured with 0.10.2; widen it only after checking that a new
# version knows the flag.
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


def apply_default_cpu_flags(environ: MutableMapping[str, str] | None = None, modules: Mapping | None = None,
                            jaxlib_version: str | None = None) -> bool:
    """Append `FAST_CPU_XLA_FLAGS` to `environ["XLA_FLAGS"]` (default `os.environ`) unless the user opted out
    (`JAXTUNE_XLA_CPU_FLAGS=0`), XLA_FLAGS already sets the flag, jax is already imported (`modules`, default
    `sys.modules`: its backend may have read XLA_FLAGS already), or the jaxlib version (default: the
    installed one, read without importing it) is not known to have the flag. True when it appended."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get(OPT_OUT_VAR, "").strip() == "0":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags or "jax" in modules or "jaxlib" in modules:
        return False
    if not _known_good(jaxlib_version if jaxlib_version is not None else _jaxlib_version()):
        return False
    environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_XLA_FLAGS}".strip()
    return True
