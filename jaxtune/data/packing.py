"""Pack shifted examples into fixed `seq_len` rows with segment ids and per-segment positions.

A row plan is a list of example indices per row; planning needs only lengths, so a loader can count
steps before touching tokens. Slots no example fills are padding: segment id 0, loss mask 0, position 0.
Real segments are numbered from 1 within each row, and positions restart at 0 in each segment.
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def first_fit(lengths: np.ndarray, order, seq_len: int, open_rows: int = 64) -> list[np.ndarray]:
    """First-fit packing over `order` with at most `open_rows` rows open at once (bounded work per
    example); when none fits and all are open, the fullest row is closed. Deterministic in `order`."""
    rows: list[list[int]] = []
    members: list[list[int]] = []
    space = np.empty(0, np.int64)
    for idx in order:
        n = int(lengths[idx])
        if not 0 < n <= seq_len:
            raise ValueError(f"example {idx} has {n} tokens; it must have 1..{seq_len} (apply the overlong "
                             "policy before packing)")
        fits = np.flatnonzero(space >= n)
        if fits.size:
            j = int(fits[0])
        else:
            if len(members) == open_rows:
                k = int(np.argmin(space))
                rows.append(members.pop(k))
                space = np.delete(space, k)
            members.append([])
            space = np.append(space, seq_len)
            j = len(members) - 1
        members[j].append(int(idx))
        space[j] -= n
        if space[j] == 0:
            rows.append(members.pop(j))
            space = np.delete(space, j)
    rows.extend(members)
    return [np.asarray(r, np.int64) for r in rows]


def plan_rows(lengths: np.ndarray, order, seq_len: int, packing: bool = True) -> list[np.ndarray]:
    """Rows of example indices: first-fit packed, or one example per row (padded mode)."""
    if packing:
        return first_fit(lengths, order, seq_len)
    too_long = [int(i) for i in order if lengths[i] > seq_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {int(lengths[too_long[0]])} tokens > seq_len {seq_len}")
    return [np.asarray([i], np.int64) for i in order]


def efficiency(lengths: np.ndarray, rows: list[np.ndarray], seq_len: int) -> float:
    """Real tokens / row slots: 1.0 is no padding at all."""
    if not rows:
        return 0.0
    return float(sum(int(lengths[r].sum()) for r in rows)) / (len(rows) * seq_len)


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """All-padding rows: pad ids, zero mask, segment 0."""
    out = {k: np.zeros((n, seq_len), np.int32) for k in BATCH_KEYS}
    out["input_ids"][:] = pad_id
    out["targets"][:] = pad_id
    return out


def fill_row(out: dict[str, np.ndarray], r: int, examples, members) -> None:
    """Write the examples `members` into row `r` of `out`, segments numbered from 1."""
    pos = 0
    for seg, idx in enumerate(members, 1):
        ex = examples[int(idx)]
        n = ex["input_ids"].shape[0]
        for k in ("input_ids", "targets", "loss_mask"):
            out[k][r, pos:pos + n] = ex[k]
        out["segment_ids"][r, pos:pos + n] = seg
        out["positions"][r, pos:pos + n] = np.arange(n, dtype=np.int32)
        pos += n


def build_batch(examples, rows: list[np.ndarray], batch_size: int, seq_len: int, pad_id: int) -> dict:
    """A `[batch_size, seq_len]` int32 batch from up to `batch_size` planned rows; missing rows are padding."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    out = empty_rows(batch_size, seq_len, pad_id)
    for r, members in enumerate(rows):
        fill_row(out, r, examples, members)
    return out


def pack_examples(examples, seq_len: int, *, packing: bool = True, pad_id: int = 0, order=None) -> dict:
    """All examples (in `order`, default as given) as one `[rows, seq_len]` array dict, e.g. for evaluation."""
    lengths = np.asarray([ex["input_ids"].shape[0] for ex in examples], np.int64)
    rows = plan_rows(lengths, range(len(examples)) if order is None else order, seq_len, packing)
    return build_batch(examples, rows, len(rows), seq_len, pad_id)
