"""What the benchmark scripts rely on that a GPU session cannot afford to find broken (no timings here)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_train  # noqa: E402


def test_random_weights_of_an_8b_stack_draw_in_slices():
    """The 24 GiB-capped 8B run died drawing one stacked MLP weight (its RNG temporaries: 28 GiB as
    compiled here); drawn slice by slice they stay near one slice's worth."""
    draw = jax.jit(bench_train._random_leaf, static_argnums=(1, 2))
    mem = draw.lower(jax.random.key(0), (32, 14336, 4096), jnp.bfloat16).compile().memory_analysis()
    assert mem.output_size_in_bytes == 32 * 14336 * 4096 * 2 and mem.temp_size_in_bytes < 2 * 2**30
    x = np.asarray(jax.jit(bench_train._random_leaf, static_argnums=(1, 2, 3))(
        jax.random.key(0), (6, 1000, 8), jnp.float32, 10_000))  # forced into 6 slices of 8,000
    assert x.shape == (6, 1000, 8) and abs(x.std() - 0.02) < 1e-3 and abs(x.mean()) < 1e-3
    assert not np.allclose(x[0], x[1])  # each slice has its own key
    assert np.all(np.asarray(draw(jax.random.key(0), (7,), jnp.bfloat16)) == 1)  # norms
