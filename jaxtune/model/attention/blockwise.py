"""`blockwise`: flash attention in pure JAX (online softmax over key blocks) with a hand-written backward.

Runs on any platform. For self-attention, key blocks that lie wholly after a query block, or wholly outside a
static sliding window, are never computed: the causal triangle costs about half of the dense `[T, T]`
scores, and neither pass materialises them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.model.attention.mask import NEG_INF, is_self, scaled_q, score_scale, static_bool

Array = jax.Array
# Blocks per side at most: each block diagonal is one unrolled step, so this bounds graph size and compile time.
MAX_BLOCKS = 16
MIN_BLOCK = 64


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


def _masked_scores(qb, kb, qi, ki, qs, ks, window, sliding, g, softcap):
    """Scores `[n, B, K, G·bq, bk]` (fp32) of a diagonal, soft-capped, invisible entries at NEG_INF; and the
    cap's slope 1 - tanh² that the backward multiplies into dS (None without a cap)."""
    s = jnp.einsum("nbkrd,nbksd->nbkrs", qb, kb, preferred_element_type=jnp.float32)
    slope = None
    if softcap is not None:
        t = jnp.tanh(s / softcap)
        s, slope = t * softcap, 1.0 - t * t
    n, b, kh, r, bk = s.shape
    s = jnp.where(_diag_mask(qi, ki, qs, ks, window, sliding), s.reshape(n, b, kh, g, r // g, bk), NEG_INF)
    return s.reshape(n, b, kh, r, bk), slope


def _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, *, window, diags, g, softcap):
    """Online softmax over block diagonals. Layout is block-major so a diagonal is a contiguous slice and
    every matmul has its batch axes leading (no transposes): `q` `[nq, B, K, G·bq, D]` (pre-scaled; the G
    query heads of a KV head stacked as rows), `k,v` `[nk, B, K, bk, D]`, indices `[n, B, b]`. Returns out
    (fp32, q's layout) and the row log-sum-exp, +inf on rows that saw no key so the backward skips them."""
    m = jnp.full(q.shape[:-1], NEG_INF, jnp.float32)
    l = jnp.zeros(q.shape[:-1], jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    for o, a, e in diags:
        qs, ks = slice(a, e), slice(a - o, e - o)
        s, _ = _masked_scores(q[qs], k[ks], q_idx[qs], k_idx[ks], q_seg[qs], k_seg[ks], window, sliding, g, softcap)
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


def _flash_bwd(q, k, v, q_idx, k_idx, q_seg, k_seg, sliding, out, lse, dout, *, window, diags, g, softcap):
    """Recompute each diagonal's probabilities from `lse` (keeping the forward's would cost O(T²) memory);
    accumulate dq, dk, dv in fp32."""
    cdt = q.dtype
    delta = jnp.sum(dout * out, axis=-1)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for o, a, e in diags:
        qs, ks = slice(a, e), slice(a - o, e - o)
        qb, kb, dob = q[qs], k[ks], dout[qs].astype(cdt)
        s, slope = _masked_scores(qb, kb, q_idx[qs], k_idx[ks], q_seg[qs], k_seg[ks], window, sliding, g, softcap)
        p = jnp.exp(s - lse[qs][..., None])
        dv = dv.at[ks].add(jnp.einsum("nbkrs,nbkrd->nbksd", p.astype(cdt), dob, preferred_element_type=jnp.float32))
        dp = jnp.einsum("nbkrd,nbksd->nbkrs", dob, v[ks], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[qs][..., None])
        ds = (ds if slope is None else ds * slope).astype(cdt)
        dq = dq.at[qs].add(jnp.einsum("nbkrs,nbksd->nbkrd", ds, kb, preferred_element_type=jnp.float32))
        dk = dk.at[ks].add(jnp.einsum("nbkrs,nbkrd->nbksd", ds, qb, preferred_element_type=jnp.float32))
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _flash(window: int | None, diags: tuple, g: int, softcap: float | None):
    """custom_vjp flash attention for one static tiling and cap (cached so equal ones share one function)."""
    static = dict(window=window, diags=diags, g=g, softcap=softcap)

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


def attention(q: Array, k: Array, v: Array, *, q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array,
              window: int | None, sliding: Array | bool = True, scale: float | None = None,
              softcap: float | None = None, block: int | None = None) -> Array:
    """Flash attention in pure JAX; lengths that are not a block multiple are padded with invisible slots.
    `scale` is folded into q; the soft-cap applies to the scaled scores inside the kernel.

    Cached queries (not self-attention) use one query block of all rows against key blocks, so a decode
    step is not padded to a block of rows."""
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    causal = is_self(q, k, q_idx, k_idx)
    bk = block or block_size(s_len)
    bq = bk if causal else -(-t // 8) * 8
    static_sliding = static_bool(sliding) if window is not None else None
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
    # [B, T, K·G, D] → [nq, B, K, G·bq, D]; keys/values → [nk, B, K, bk, D]; indices → [n, B, b].
    qt = jnp.transpose(_pad_to(q, tp, 1, 0).reshape(b, nq, bq, kh, g, d), (1, 0, 3, 4, 2, 5)).reshape(
        nq, b, kh, g * bq, d)
    qt = scaled_q(qt, score_scale(d, scale))
    kt = jnp.transpose(_pad_to(k, sp, 1, 0).reshape(b, nk, bk, kh, d), (1, 0, 3, 2, 4))
    vt = jnp.transpose(_pad_to(v, sp, 1, 0).reshape(b, nk, bk, kh, d), (1, 0, 3, 2, 4))
    blocked = lambda x, n, m: jnp.transpose(x.reshape(b, n, m), (1, 0, 2))  # noqa: E731
    out = _flash(window, diags, g, softcap)(qt, kt, vt, blocked(q_idx_p, nq, bq), blocked(k_idx_p, nk, bk),
                                            blocked(q_seg_p, nq, bq), blocked(k_seg_p, nk, bk), jnp.asarray(sliding))
    out = jnp.transpose(out.reshape(nq, b, kh, g, bq, d), (1, 0, 4, 2, 3, 5)).reshape(b, tp, h, d)[:, :t]
    return out.astype(q.dtype)
