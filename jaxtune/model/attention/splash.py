"""`splash`: Pallas splash attention (TPU; in interpret mode elsewhere, which is only for tests), causal or
local mask objects plus its native segment ids, run per device under `shard_map` on a mesh. Splash never
scales scores itself: the scale is folded into q, and its `attn_logits_soft_cap` caps the scaled scores before
the mask, as HF does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxtune.model.attention import blockwise, xla
from jaxtune.model.attention.mask import is_self, operand_platform, scaled_q, score_scale, static_bool
from jaxtune.model.sharding import logical_to_spec

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


def _local(qt, kt, vt, seg, sliding, *, window, softcap, interpret):
    """Splash over `[B, KH, G, T, D]` queries and `[B, KH, T, D]` keys/values on one device's share: one MQA
    kernel call per batch row and KV head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    t, g = qt.shape[3], qt.shape[2]

    def call(win):
        kernel = splash_kernel(t, g, win, softcap, interpret)

        def row(qr, kr, vr, s):
            ids = sk.SegmentIds(q=s, kv=s)
            return jax.vmap(lambda qh, kk, vv: kernel(qh, kk, vv, segment_ids=ids))(qr, kr, vr)

        return jax.vmap(row)

    if window is None:
        return call(None)(qt, kt, vt, seg)
    static_sliding = static_bool(sliding)
    if static_sliding is None:
        return jax.lax.cond(sliding, call(window), call(None), qt, kt, vt, seg)
    return call(window if static_sliding else None)(qt, kt, vt, seg)


def _mesh_specs(qt: Array, kt: Array):
    """`(mesh, q spec, kv spec, segment spec)` to run splash per device under `shard_map`, or None on one device.
    XLA cannot partition the kernel's custom call (it would gather the whole batch onto every device), so each
    device runs it on its own rows (batch over data×fsdp×expert) and KV heads (over tensor, when it divides them)."""
    mesh = jax.typeof(qt).sharding.mesh
    if mesh.empty or not any(n > 1 for n, kind in zip(mesh.axis_sizes, mesh.axis_types) if kind != AxisType.Manual):
        return None
    kv = logical_to_spec(("batch", "kv_heads", None, None), mesh=mesh, shape=kt.shape)
    q = P(kv[0], kv[1], None, None, None)
    return mesh, q, kv, P(kv[0], None)


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None, interpret: bool | None = None) -> Array:
    """Pallas splash attention, one MQA kernel per KV head (GQA) and batch row, with splash's own segment
    ids; on a mesh, per device under `shard_map`. Off TPU it runs in Pallas interpret mode (slow; for tests).
    Lengths splash cannot tile use `blockwise`; cached decode uses the dense reference."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    if not is_self(q, k, q_idx, k_idx):
        return xla.attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                             sliding=sliding, scale=scale, softcap=softcap)
    if t % BLOCK:
        return blockwise.attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                                   sliding=sliding, scale=scale, softcap=softcap)
    if interpret is None:
        interpret = (operand_platform(q) or jax.default_backend()) != "tpu"
    qt = scaled_q(jnp.transpose(q.reshape(b, t, kh, g, d), (0, 2, 3, 1, 4)), score_scale(d, scale))
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    local = functools.partial(_local, window=window, softcap=softcap, interpret=interpret)
    sliding = jnp.asarray(sliding) if static_bool(sliding) is None else sliding
    specs = _mesh_specs(qt, kt)
    if specs is None:
        out = local(qt, kt, vt, q_seg, sliding)
    else:
        mesh, q_spec, kv_spec, seg_spec = specs
        static = static_bool(sliding) is not None
        body = (lambda qt, kt, vt, seg: local(qt, kt, vt, seg, sliding)) if static else local
        args = (qt, kt, vt, q_seg) + (() if static else (sliding,))
        in_specs = (q_spec, kv_spec, kv_spec, seg_spec) + (() if static else (P(),))
        out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
