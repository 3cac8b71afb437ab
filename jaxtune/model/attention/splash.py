"""`splash`: Pallas splash attention (TPU; in interpret mode elsewhere, which is only for tests), causal or
local mask objects plus its native segment ids. Splash never scales scores itself: the scale is folded into
q, and its `attn_logits_soft_cap` caps the scaled scores before the mask, as HF does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.model.attention import blockwise, xla
from jaxtune.model.attention.mask import is_self, scaled_q, score_scale, static_bool

Array = jax.Array
BLOCK = 128  # splash tiles are multiples of 128 rows


def splash_masks(t: int, g: int, window: int | None):
    """Splash `MultiHeadMask` over the `g` query heads that share one KV head: causal, or with a window
    HF's `q - window < k` (a left window of `window - 1`, which is causal too)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), 0)
    return sm.MultiHeadMask([one] * g)


@functools.lru_cache(maxsize=None)
def splash_kernel(t: int, g: int, window: int | None, softcap: float | None, interpret: bool):
    """The MQA splash kernel for one KV head's `g` query heads (mask preprocessing runs once per shape)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    blk = max(x for x in (512, 256, 128) if t % x == 0)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    # Concrete mask-info arrays, not tracers of whichever trace first asked: the kernel is cached.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(splash_masks(t, g, window), block_sizes=sizes,
                                                attn_logits_soft_cap=softcap, interpret=interpret)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None, interpret: bool | None = None) -> Array:
    """Pallas splash attention, one MQA kernel per KV head (GQA) and batch row, with splash's own segment
    ids. Off TPU it runs in Pallas interpret mode (slow; for tests). Lengths splash cannot tile use
    `blockwise`; cached decode uses the dense reference."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    if not is_self(q, k, q_idx, k_idx):
        return xla.attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                             sliding=sliding, scale=scale, softcap=softcap)
    if t % BLOCK:
        return blockwise.attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                                   sliding=sliding, scale=scale, softcap=softcap)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    qt = scaled_q(jnp.transpose(q.reshape(b, t, kh, g, d), (0, 2, 3, 1, 4)), score_scale(d, scale))
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def call(win):
        kernel = splash_kernel(t, g, win, softcap, interpret)

        def row(qr, kr, vr, seg):
            ids = sk.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda qh, kk, vv: kernel(qh, kk, vv, segment_ids=ids))(qr, kr, vr)

        return jax.vmap(row)

    static_sliding = static_bool(sliding) if window is not None else False
    if static_sliding is None:
        out = jax.lax.cond(sliding, call(window), call(None), qt, kt, vt, q_seg)
    else:
        out = call(window if static_sliding else None)(qt, kt, vt, q_seg)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
