"""jaxtune's on-disk caches: one root (`$JAXTUNE_CACHE_DIR`, default `$XDG_CACHE_HOME/jaxtune` or
`~/.cache/jaxtune`) for the built CPU attention kernel (`kernels/`), XLA's compiled programs (`xla/`) and
tokenized data (`data/`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("JAXTUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxtune")
    return Path(root)


def enable_compile_cache() -> Path:
    """Point JAX's persistent compilation cache at `cache_dir()/xla` unless the user already chose one
    (`JAX_COMPILATION_CACHE_DIR` or `jax.config`). A re-run of a recipe then loads its train and eval steps
    instead of compiling them (tracing and lowering remain). JAX keys entries by the program, its shardings, jax/jaxlib and XLA flags, and caches
    only compiles that took ≥ `jax_persistent_cache_min_compile_time_secs` (1 s by default)."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    return Path(jax.config.jax_compilation_cache_dir)
