"""The visibility rule every backend applies, and the helpers the backends share.

Key slot `k` is visible from query slot `q` (slots are indices in the sequence or KV cache) when
`k <= q`, both carry the same non-zero segment id, and on sliding layers HF's window rule `q - W < k` holds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
# Large but finite: a row that sees nothing stays NaN-free through max, exp and their gradients.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility(q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array, window: int | None,
               sliding: Array | bool = True) -> Array:
    """Boolean mask `[B, T, S]` from slot indices `[B, T]`/`[B, S]` and segment ids."""
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    mask = (ki <= qi) & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    if window is not None:
        mask = mask & (jnp.logical_not(sliding) | (qi - window < ki))
    return mask


def score_scale(d: int, scale: float | None) -> float:
    """The factor scores are multiplied by: `scale`, or 1/sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def scaled_q(q: Array, scale: float) -> Array:
    """`q * scale` in q's dtype for kernels that fold the scale into q, multiplied in fp32 so that a scale
    like Gemma's 224**-0.5 is not itself rounded to bf16 (a bias on every score)."""
    return (q.astype(jnp.float32) * scale).astype(q.dtype)


def operand_platform(x: Array) -> str | None:
    """The platform of the mesh `x` is laid out on, known while tracing: a compile for another topology (a TPU
    compiled from this CPU host) sees its target's platform here. None for an array on no mesh."""
    mesh = jax.typeof(x).sharding.mesh
    mesh = getattr(mesh, "abstract_mesh", mesh)
    device = getattr(mesh, "abstract_device", None)
    return None if mesh.empty or device is None else device.platform


def static_bool(x) -> bool | None:
    """`x` as a Python bool when it is known at trace time, else None (a traced per-layer flag)."""
    try:
        return bool(x)
    except jax.errors.ConcretizationTypeError:
        return None


def is_self(q: Array, k: Array, q_idx: Array, k_idx: Array) -> bool:
    """Self-attention: the caller passed one slot-index array as both `q_idx` and `k_idx` (the model does,
    outside the KV-cache path). Slot indices increase along each row, which makes causal block skipping exact."""
    return q_idx is k_idx and q.shape[1] == k.shape[1]
