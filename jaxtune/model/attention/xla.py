"""`xla`: dense attention, the reference every other backend is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.model.attention.mask import NEG_INF, score_scale, visibility

Array = jax.Array


def xla_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float | None = None,
                  softcap: float | None = None) -> Array:
    """`q[B,T,H,D]` over `k,v[B,S,K,D]` (GQA by grouping) under a boolean `mask[B,T,S]`, as HF eager does it:
    scores times `scale`, soft-capped, then masked, softmax in fp32."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(score_scale(d, scale))
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None) -> Array:
    """The backend interface: `xla_attention` under `visibility`."""
    return xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, sliding), scale=scale,
                         softcap=softcap)
