"""One attention interface; the backend is chosen by platform and config.

Visibility of key slot `k` from query slot `q` (slots are indices in the sequence or KV cache):
causal `k <= q`, same non-zero segment id, and on sliding layers HF's window rule `q - W < k`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility(q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array, window: int | None,
               sliding: Array | bool = True) -> Array:
    """Boolean mask `[B, T, S]` from slot indices `[B, T]`/`[B, S]` and segment ids."""
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    mask = (ki <= qi) & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    if window is not None:
        mask = mask & (jnp.logical_not(sliding) | (qi - window < ki))
    return mask


def xla_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Dense reference: `q[B,T,H,D]`, `k,v[B,S,K,D]` (GQA by grouping), softmax in fp32."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, impl: str = "auto") -> Array:
    """Dispatch to a backend; every backend computes the same visibility rule."""
    from jaxtune.model import attention_kernels

    if impl == "auto":
        impl = attention_kernels.default_impl(q, k)
    if impl == "xla":
        return xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, sliding))
    return attention_kernels.run(impl, q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg,
                                 window=window, sliding=sliding)
