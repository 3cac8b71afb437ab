"""Faster attention backends behind `attention.attention`; `xla` (dense, in attention.py) is the reference.

- `blockwise`: flash-style online softmax over key blocks in pure JAX with a hand-written backward, any
  platform. For self-attention (the training and eval case) key blocks that lie wholly after a query block,
  or wholly outside a static sliding window, are never computed: the causal triangle costs about half of the
  dense `[T, T]` scores, and neither pass materialises them.
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16). Causality is its
  `is_causal`; rows holding one sequence plus right padding use its sequence-length arguments, and packed
  rows (several segment ids) add the segment-equality mask, chosen at run time.
- `cpu_flash`: a fused C++ flash kernel for XLA:CPU through the XLA FFI (`cpu_attention.py`), built on
  first use; the CPU default on a single device (XLA partitions a custom call only by replicating it).
- `splash`: Pallas splash attention (TPU; in interpret mode elsewhere, which is only for tests), causal or
  local mask objects plus its native segment ids.

Every backend applies `attention.visibility`. Rows that see no key at all (padding queries) are garbage in
every backend, as in the reference, and differ between them; nothing downstream reads them. "Self-attention"
means the caller passed the same slot-index array as `q_idx` and `k_idx` (the model does, outside the KV
cache path); slot indices increase along each row, which is what makes the block skipping exact.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune.model import cpu_attention
from jaxtune.model.attention import NEG_INF, visibility, xla_attention

Array = jax.Array
IMPLS = ("xla", "blockwise", "cpu_flash", "cudnn", "splash")
# Blocks per side at most: each block diagonal is one unrolled step, so this bounds graph size and compile time.
MAX_BLOCKS = 16
MIN_BLOCK = 64
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCK = 128  # splash tiles are multiples of 128 rows


def platform() -> str:
    return jax.default_backend()


def default_impl(q: Array, k: Array) -> str:
    """Backend for `impl="auto"`, by platform and shape (the choices follow docs/benchmarks.md).

    Decode and cached prefill (query length != key length) stay dense: one query row has nothing to skip."""
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    if t != s:
        return "xla"
    kind = platform()
    if kind == "tpu" and t % SPLASH_BLOCK == 0:
        return "splash"
    if kind == "gpu" and q.dtype in CUDNN_DTYPES and d % 8 == 0 and d <= 128:
        return "cudnn"
    if kind == "cpu" and jax.device_count() == 1 and cpu_attention.supports(q, k) and cpu_attention.available():
        return "cpu_flash"
    return "blockwise"


def run(impl: str, q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
        window: int | None, sliding: Array | bool = True) -> Array:
    """Attention of `q[B,T,H,D]` over `k,v[B,S,K,D]` (GQA by grouping) with backend `impl`."""
    kw = dict(q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window, sliding=sliding)
    if impl == "xla":
        return xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, sliding))
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **kw)
    if impl == "cpu_flash":
        return cpu_attention.cpu_flash_attention(q, k, v, **kw)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, **kw)
    if impl == "splash":
        return splash_attention(q, k, v, **kw)
    raise ValueError(f"attention_impl={impl!r} is not available; expected one of {('auto',) + IMPLS}")


def _static_bool(x) -> bool | None:
    """`x` as a Python bool when it is known at trace time, else None (a traced per-layer flag)."""
    try:
        return bool(x)
    except jax.errors.ConcretizationTypeError:
        return None


def _is_self(q: Array, k: Array, q_idx: Array, k_idx: Array) -> bool:
    return q_idx is k_idx and q.shape[1] == k.shape[1]


# ----------------------------------------------------------------------------------------------- blockwise


def block_size(n: int) -> int:
    """Smallest power of two ≥ `MIN_BLOCK` that splits `n` into at most `MAX_BLOCKS` blocks; one block
    (rounded up to 8 rows) when `n` fits in `MIN_BLOCK`."""
    if n <= MIN_BLOCK:
        return -(-n // 8) * 8
    b = MIN_BLOCK
    while b * MAX_BLOCKS < n:
        b *= 2
    return b


def diagonals(nq: int, nk: int, causal: bool, window_blocks: int | None) -> tuple[tuple[int, int, int], ...]:
    """Block diagonals to compute, as `(offset, first, last)`: query blocks `first..last-1` meet key blocks
    `first-offset..last-offset-1`. Self-attention (`causal`) keeps offsets ≥ 0, i.e. key blocks at or
    before the query block; a static window keeps offsets ≤ `window_blocks`. Each diagonal is one batched
    step, so the graph grows with the block count, not with its square."""
    lo = 0 if causal else -(nk - 1)
    hi = nq - 1 if window_blocks is None else min(nq - 1, window_blocks)
    return tuple((o, max(0, o), min(nq, nk + o)) for o in range(lo, hi + 1))


def window_blocks(window: int | None, block: int) -> int | None:
    """Largest block offset a window of `window` slots can reach: rows of query block i see keys of block
    i-o only if (i-o+1)·block - 1 > i·block - window, i.e. o < 1 + (window - 1) / block."""
    return None if window is None else -(-(window - 1) // block)


def _pad_to(x: Array, n: int, axis: int, fill) -> Array:
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=fill)


def _pad_idx(idx: Array, n: int) -> Array:
    """Extend slot indices past the end, still increasing, so padded slots never break the block skipping."""
    extra = n - idx.shape[1]
    if extra == 0:
        return idx
    return jnp.concatenate([idx, idx[:, -1:] + 1 + jnp.arange(extra, dtype=idx.dtype)], axis=1)


def _diag_mask(qi, ki, qs, ks, window, sliding) -> Array:
    """`visibility` on blocked indices `[n, B, bq]`/`[n, B, bk]`, shaped `[n, B, 1, 1, bq, bk]` to broadcast
    over scores viewed as `[n, B, K, G, bq, bk]`."""
    m = (ki[:, :, None, :] <= qi[:, :, :, None]) & (qs[:, :, :, None] == ks[:, :, None, :]) & (ks[:, :, None, :] != 0)
    if window is not None:
        m = m & (jnp.logical_not(sliding) | (qi[:, :, :, None] - window < ki[:, :, None, :]))
    return m[:, :, None, None]


def _masked_scores(qb, kb, qi, ki, qs, ks, window, sliding, g):
    """Scores `[n, B, K, G·bq, bk]` (fp32) of a diagonal, invisible entries at NEG_INF."""
    s = jnp.einsum("nbkrd,nbksd->nbkrs", qb, kb, preferred_element_type=jnp.float32)
    n, b, kh, r, bk = s.shape
    s = jnp.where(_diag_mask(qi, ki, qs, ks, window, sliding), s.reshape(n, b, kh, g, r // g, bk), NEG_INF)
    return s.reshape(n, b, kh, r, bk)


def _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, *, window, diags, g):
    """Online softmax over block diagonals. Layout is block-major so a diagonal is a contiguous slice and
    every matmul has its batch axes leading (no transposes): `q` `[nq, B, K, G·bq, D]` (pre-scaled; the G
    query heads of a KV head stacked as rows), `k,v` `[nk, B, K, bk, D]`, indices `[n, B, b]`. Returns out
    (fp32, q's layout) and the row log-sum-exp, +inf on rows that saw no key so the backward skips them."""
    m = jnp.full(q.shape[:-1], NEG_INF, jnp.float32)
    l = jnp.zeros(q.shape[:-1], jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    for o, a, e in diags:
        qs, ks = slice(a, e), slice(a - o, e - o)
        s = _masked_scores(q[qs], k[ks], q_idx[qs], k_idx[ks], q_seg[qs], k_seg[ks], window, sliding, g)
        m_new = jnp.maximum(m[qs], jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m[qs] - m_new)
        pv = jnp.einsum("nbkrs,nbksd->nbkrd", p.astype(v.dtype), v[ks], preferred_element_type=jnp.float32)
        l = l.at[qs].set(l[qs] * corr + jnp.sum(p, axis=-1))
        acc = acc.at[qs].set(acc[qs] * corr[..., None] + pv)
        m = m.at[qs].set(m_new)
    seen = m > 0.5 * NEG_INF
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[..., None], acc / l_safe[..., None], 0.0)
    return out, jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def _flash_bwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, out, lse, dout, *, window, diags, g):
    """Recompute each diagonal's probabilities from `lse` (keeping the forward's was measured slower on
    CPU, and costs O(T²) memory); accumulate dq, dk, dv in fp32."""
    cdt = q.dtype
    delta = jnp.sum(dout * out, axis=-1)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for o, a, e in diags:
        qs, ks = slice(a, e), slice(a - o, e - o)
        qb, kb, dob = q[qs], k[ks], dout[qs].astype(cdt)
        s = _masked_scores(qb, kb, q_idx[qs], k_idx[ks], q_seg[qs], k_seg[ks], window, sliding, g)
        p = jnp.exp(s - lse[qs][..., None])
        dv = dv.at[ks].add(jnp.einsum("nbkrs,nbkrd->nbksd", p.astype(cdt), dob, preferred_element_type=jnp.float32))
        dp = jnp.einsum("nbkrd,nbksd->nbkrs", dob, v[ks], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[qs][..., None])).astype(cdt)
        dq = dq.at[qs].add(jnp.einsum("nbkrs,nbksd->nbkrd", ds, kb, preferred_element_type=jnp.float32))
        dk = dk.at[ks].add(jnp.einsum("nbkrs,nbkrd->nbksd", ds, qb, preferred_element_type=jnp.float32))
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _flash(window: int | None, diags: tuple, g: int):
    """custom_vjp flash attention for one static tiling (cached so equal tilings share one function)."""
    static = dict(window=window, diags=diags, g=g)

    @jax.custom_vjp
    def f(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding):
        return _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, **static)[0]

    def fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding):
        out, lse = _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, **static)
        return out, (q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, out, lse)

    def bwd(res, dout):
        q, k, v, *_ = res
        dq, dk, dv = _flash_bwd(*res, dout.astype(jnp.float32), **static)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None

    f.defvjp(fwd, bwd)
    return f


def blockwise_attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
                        window: int | None, sliding: Array | bool = True, block: int | None = None) -> Array:
    """Flash attention in pure JAX; lengths that are not a block multiple are padded with invisible slots.

    Cached queries (not self-attention) use one query block of all rows against key blocks, so a decode
    step is not padded to a block of rows."""
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    causal = _is_self(q, k, q_idx, k_idx)
    bk = block or block_size(s_len)
    bq = bk if causal else -(-t // 8) * 8
    static_sliding = _static_bool(sliding) if window is not None else None
    if static_sliding is False:
        window = None
    tp, sp = -(-t // bq) * bq, -(-s_len // bk) * bk
    q_idx_p = _pad_idx(q_idx, tp)
    q_seg_p = _pad_to(q_seg, tp, 1, 0)
    k_idx_p = q_idx_p if causal else _pad_idx(k_idx, sp)
    k_seg_p = q_seg_p if causal else _pad_to(k_seg, sp, 1, 0)
    nq, nk = tp // bq, sp // bk
    reach = window_blocks(window, bk) if causal and static_sliding else None
    diags = diagonals(nq, nk, causal, reach)
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    # [B, T, K·G, D] → [nq, B, K, G·bq, D]; keys/values → [nk, B, K, bk, D]; indices → [n, B, b].
    qt = jnp.transpose(_pad_to(q, tp, 1, 0).reshape(b, nq, bq, kh, g, d), (1, 0, 3, 4, 2, 5)).reshape(
        nq, b, kh, g * bq, d) * scale
    kt = jnp.transpose(_pad_to(k, sp, 1, 0).reshape(b, nk, bk, kh, d), (1, 0, 3, 2, 4))
    vt = jnp.transpose(_pad_to(v, sp, 1, 0).reshape(b, nk, bk, kh, d), (1, 0, 3, 2, 4))
    blocked = lambda x, n, m: jnp.transpose(x.reshape(b, n, m), (1, 0, 2))  # noqa: E731
    out = _flash(window, diags, g)(qt, kt, vt, blocked(q_idx_p, nq, bq), blocked(k_idx_p, nk, bk),
                                   blocked(q_seg_p, nq, bq), blocked(k_seg_p, nk, bk), jnp.asarray(sliding))
    out = jnp.transpose(out.reshape(nq, b, kh, g, bq, d), (1, 0, 4, 2, 3, 5)).reshape(b, tp, h, d)[:, :t]
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------- cuDNN


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


def single_segment_rows(seg: Array) -> Array:
    """True when every row is one non-zero segment id followed only by padding (0)."""
    t = seg.shape[1]
    lengths = jnp.sum(seg != 0, axis=1, keepdims=True)
    expect = jnp.where(jnp.arange(t)[None, :] < lengths, seg[:, :1], 0)
    return jnp.all(seg == expect)


def cudnn_attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
                    window: int | None, sliding: Array | bool = True, implementation: str = "cudnn") -> Array:
    """cuDNN flash attention for self-attention; cached decode/prefill (no causal-by-position structure)
    uses the dense reference. A traced per-layer `sliding` flag selects between the windowed and the plain
    call at run time. `implementation="xla"` runs the same arguments through JAX's reference
    `dot_product_attention`, which is how the argument construction is tested without a GPU."""
    if not _is_self(q, k, q_idx, k_idx):
        return xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, sliding))
    static_sliding = _static_bool(sliding) if window is not None else False

    def call(win):
        single, packed = cudnn_args(q_seg, win)

        def attend(kw):
            return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)

        return lambda q, k, v: jax.lax.cond(single_segment_rows(q_seg), attend(single), attend(packed), q, k, v)

    if static_sliding is None:
        return jax.lax.cond(sliding, call(window), call(None), q, k, v)
    return call(window if static_sliding else None)(q, k, v)


# ----------------------------------------------------------------------------------------------- splash


def splash_masks(t: int, g: int, window: int | None):
    """Splash `MultiHeadMask` over the `g` query heads that share one KV head: causal, or with a window
    HF's `q - window < k` (a left window of `window - 1`, which is causal too)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), 0)
    return sm.MultiHeadMask([one] * g)


@functools.lru_cache(maxsize=None)
def splash_kernel(t: int, g: int, window: int | None, interpret: bool):
    """The MQA splash kernel for one KV head's `g` query heads (mask preprocessing runs once per shape)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    blk = max(x for x in (512, 256, 128) if t % x == 0)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    # Concrete mask-info arrays, not tracers of whichever trace first asked: the kernel is cached.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(splash_masks(t, g, window), block_sizes=sizes, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
                     window: int | None, sliding: Array | bool = True, interpret: bool | None = None) -> Array:
    """Pallas splash attention, one MQA kernel per KV head (GQA) and batch row, with splash's own segment
    ids. Off TPU it runs in Pallas interpret mode (slow; for tests). Lengths splash cannot tile use
    `blockwise`; cached decode uses the dense reference."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    if not _is_self(q, k, q_idx, k_idx):
        return xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, sliding))
    if t % SPLASH_BLOCK:
        return blockwise_attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_seg=q_seg, k_seg=k_seg, window=window,
                                   sliding=sliding)
    interpret = platform() != "tpu" if interpret is None else interpret
    qt = jnp.transpose(q.reshape(b, t, kh, g, d), (0, 2, 3, 1, 4)) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def call(win):
        kernel = splash_kernel(t, g, win, interpret)

        def row(qr, kr, vr, seg):
            ids = sk.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda qh, kk, vv: kernel(qh, kk, vv, segment_ids=ids))(qr, kr, vr)

        return jax.vmap(row)

    static_sliding = _static_bool(sliding) if window is not None else False
    if static_sliding is None:
        out = jax.lax.cond(sliding, call(window), call(None), qt, kt, vt, q_seg)
    else:
        out = call(window if static_sliding else None)(qt, kt, vt, q_seg)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
