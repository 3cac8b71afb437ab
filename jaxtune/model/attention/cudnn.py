"""`cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16). It takes a score
`scale` but has no logit soft-capping: a `softcap` is refused (`auto` never picks this backend for one).

Causality is its `is_causal`; rows holding one sequence plus right padding use its sequence-length
arguments, and packed rows (several segment ids) add the segment-equality mask, chosen at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.model.attention import xla
from jaxtune.model.attention.mask import is_self, static_bool

Array = jax.Array
DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_args(q_seg: Array, window: int | None) -> tuple[dict, dict]:
    """Keyword arguments for `jax.nn.dot_product_attention` expressing `visibility` for self-attention on a
    layer whose window (if any) applies: `(single, packed)`. `single` is exact when every row is one segment
    followed by padding (sequence lengths); `packed` adds the segment-equality mask for anything else. Both
    are causal by array position, which equals causal by slot for increasing slot indices."""
    local = None if window is None else (window - 1, 0)
    lengths = jnp.sum(q_seg != 0, axis=1).astype(jnp.int32)
    single = dict(is_causal=True, local_window_size=local, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    mask = (q_seg[:, :, None] == q_seg[:, None, :]) & (q_seg[:, None, :] != 0)
    packed = dict(is_causal=True, local_window_size=local, mask=mask[:, None])
    return single, packed


def supported_gpu() -> bool:
    """cuDNN's fused attention in JAX needs an Ampere or newer GPU (compute capability 8.0+): not a T4 (7.5)."""
    caps = [getattr(d, "compute_capability", None) for d in jax.local_devices()]
    return all(c is not None and float(c) >= 8.0 for c in caps)


def check_softcap(softcap: float | None) -> None:
    if softcap is not None:
        raise ValueError(f"attention_impl='cudnn': cuDNN attention cannot soft-cap attention logits "
                         f"(softcap={softcap}); use attention_impl 'auto', 'xla' or 'blockwise'")


def single_segment_rows(seg: Array) -> Array:
    """True when every row is one non-zero segment id followed only by padding (0)."""
    t = seg.shape[1]
    lengths = jnp.sum(seg != 0, axis=1, keepdims=True)
    expect = jnp.where(jnp.arange(t)[None, :] < lengths, seg[:, :1], 0)
    return jnp.all(seg == expect)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None, implementation: str = "cudnn") -> Array:
    """cuDNN flash attention for self-attention; cached decode/prefill (no causal-by-position structure)
    uses the dense reference. A traced per-layer `sliding` flag selects between the windowed and the plain
    call at run time. `implementation="xla"` runs the same arguments through JAX's reference
    `dot_product_attention`, which is how the argument construction is tested without a GPU."""
    check_softcap(softcap)
    if not is_self(q, k, q_idx, k_idx):
        return xla.attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                             sliding=sliding, scale=scale)
    static_sliding = static_bool(sliding) if window is not None else False

    def call(win):
        single, packed = cudnn_args(q_seg, win)

        def attend(kw):
            return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                                                **kw)

        return lambda q, k, v: jax.lax.cond(single_segment_rows(q_seg), attend(single), attend(packed), q, k, v)

    if static_sliding is None:
        return jax.lax.cond(sliding, call(window), call(None), q, k, v)
    return call(window if static_sliding else None)(q, k, v)
