"""Packing and the grain loader: every token exactly once per epoch, segment ids and positions, efficiency,
seed determinism, sharding, fixed shapes, and exact resume from a saved iterator state."""

import json

import numpy as np
import pytest

from jaxtune.data.loader import make_loader, pad_id_for
from jaxtune.data.packing import BATCH_KEYS, pack_examples
from jaxtune.data.packing import first_fit

SEQ = 32
PAD = 7


def synthetic(n, seed=0, max_len=SEQ):
    """Examples whose tokens encode (example, position): id = 1000 * (example + 1) + position."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, max_len + 1))
        ids = 1000 * (i + 1) + np.arange(length + 1, dtype=np.int32)
        mask = rng.integers(0, 2, length).astype(np.int32)
        out.append({"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": mask})
    return out


def segments(batch):
    """(row, segment id, slice) for every real segment in a batch."""
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            yield r, int(s), np.flatnonzero(seg == s)


def check_batch_layout(batch, batch_size):
    assert set(batch) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert batch[k].shape == (batch_size, SEQ) and batch[k].dtype == np.int32
    pad = batch["segment_ids"] == 0
    assert (batch["loss_mask"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
    assert (batch["input_ids"][pad] == PAD).all() and (batch["targets"][pad] == PAD).all()
    for r in range(batch_size):
        seg = batch["segment_ids"][r]
        real = seg[seg > 0]
        # segments numbered 1, 2, ... in order, contiguous, then only padding
        assert np.array_equal(np.unique(real), np.arange(1, len(np.unique(real)) + 1))
        assert (np.diff(real) >= 0).all() and (seg[len(real):] == 0).all()
    for r, _, where in segments(batch):
        assert np.array_equal(where, np.arange(where[0], where[0] + where.size))
        assert np.array_equal(batch["positions"][r, where], np.arange(where.size))


def collect_examples(batches):
    """The examples recovered from batches, keyed by example index, in the order seen."""
    seen = []
    for b in batches:
        for r, _, where in segments(b):
            ex = {k: b[k][r, where] for k in ("input_ids", "targets", "loss_mask")}
            seen.append((int(ex["input_ids"][0]) // 1000 - 1, ex))
    return seen


def test_one_epoch_has_every_token_exactly_once():
    examples = synthetic(150)
    loader = make_loader(examples, batch_size=4, seq_len=SEQ, packing=True, seed=3, num_epochs=1, pad_id=PAD)
    batches = list(loader)
    assert len(batches) == loader.total_steps == loader.steps_per_epoch
    for b in batches:
        check_batch_layout(b, 4)
    seen = collect_examples(batches)
    assert sorted(i for i, _ in seen) == list(range(len(examples)))
    for i, ex in seen:
        for k in ex:
            assert np.array_equal(ex[k], examples[i][k])
    # segments never cross an example: a target always continues its own example
    for b in batches:
        real = b["segment_ids"] > 0
        assert (b["targets"][real] == b["input_ids"][real] + 1).all()


def test_packing_efficiency_is_real_tokens_over_slots():
    examples = synthetic(200, seed=1, max_len=12)
    total = sum(ex["input_ids"].size for ex in examples)
    packed = make_loader(examples, 8, SEQ, packing=True, pad_id=PAD)
    rows = sum(len(r) for r in packed.epoch_rows)
    assert packed.packing_efficiency == pytest.approx(total / (rows * SEQ))
    padded = make_loader(examples, 8, SEQ, packing=False, pad_id=PAD)
    assert padded.packing_efficiency == pytest.approx(total / (len(examples) * SEQ))
    assert packed.packing_efficiency > 0.9 > 2 * padded.packing_efficiency
    assert packed.total_steps < padded.total_steps


def test_padded_mode_one_example_per_row():
    examples = synthetic(20, seed=2)
    batches = list(make_loader(examples, 3, SEQ, packing=False, seed=0, pad_id=PAD))
    for b in batches:
        check_batch_layout(b, 3)
        assert set(np.unique(b["segment_ids"])) <= {0, 1}
    assert sorted(i for i, _ in collect_examples(batches)) == list(range(20))


def test_order_is_deterministic_by_seed_and_changes_per_epoch():
    examples = synthetic(60, seed=4)
    run = lambda seed: list(make_loader(examples, 2, SEQ, seed=seed, num_epochs=2, pad_id=PAD))  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS) and len(a) == len(b)
    order = lambda batches: [i for i, _ in collect_examples(batches)]  # noqa: E731
    assert order(a) != order(c)
    loader = make_loader(examples, 2, SEQ, seed=5, num_epochs=2, pad_id=PAD)
    first = order(a[:loader.epoch_steps[0]])
    second = order(a[loader.epoch_steps[0]:])
    assert sorted(first) == sorted(second) == list(range(60)) and first != second
    assert loader.epoch_of(loader.epoch_steps[0] - 1) == 0 and loader.epoch_of(loader.epoch_steps[0]) == 1


def test_resume_from_saved_state_matches_uninterrupted_run():
    examples = synthetic(120, seed=5)
    kwargs = dict(batch_size=3, seq_len=SEQ, packing=True, seed=11, num_epochs=2, pad_id=PAD)
    full = list(make_loader(examples, **kwargs))
    first = make_loader(examples, **kwargs)
    n = len(full) // 2 + 1  # crosses into the second epoch when resumed
    for _ in range(n):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make_loader(examples, **kwargs)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(full) - n
    for x, y in zip(rest, full[n:]):
        for k in BATCH_KEYS:
            assert np.array_equal(x[k], y[k])
    other = make_loader(examples, **{**kwargs, "seed": 12})
    with pytest.raises(ValueError, match="other data or loader settings"):
        other.set_state(state)


def test_hosts_split_each_global_batch_and_stay_in_lockstep():
    examples = synthetic(90, seed=6)
    single = make_loader(examples, 4, SEQ, seed=1, pad_id=PAD, num_epochs=2)
    hosts = [make_loader(examples, 2, SEQ, seed=1, pad_id=PAD, num_epochs=2, shard_index=i, shard_count=2)
             for i in range(2)]
    assert hosts[0].total_steps == hosts[1].total_steps == single.total_steps
    for step, global_batch in enumerate(single):
        parts = [next(h) for h in hosts]
        for k in BATCH_KEYS:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), global_batch[k]), (step, k)


def test_short_last_batch_is_padded_and_drop_remainder_drops_it():
    examples = [{"input_ids": np.arange(SEQ, dtype=np.int32), "targets": np.arange(1, SEQ + 1, dtype=np.int32),
                 "loss_mask": np.ones(SEQ, np.int32)} for _ in range(10)]  # full rows: 10 rows
    loader = make_loader(examples, 4, SEQ, pad_id=PAD)
    batches = list(loader)
    assert loader.total_steps == 3 and all(b["input_ids"].shape == (4, SEQ) for b in batches)
    last = batches[-1]
    assert (last["segment_ids"][:2] == 1).all() and (last["segment_ids"][2:] == 0).all()
    assert last["loss_mask"][2:].sum() == 0
    assert make_loader(examples, 4, SEQ, pad_id=PAD, drop_remainder=True).total_steps == 2


def test_first_fit_bounds_and_errors():
    lengths = np.asarray([20, 20, 12, 12, 8, 32, 1])
    rows = first_fit(lengths, range(len(lengths)), SEQ)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(lengths[r].sum() <= SEQ for r in rows)
    assert [r.tolist() for r in rows] == [[0, 2], [1, 3], [5], [4, 6]]
    with pytest.raises(ValueError, match="overlong policy"):
        first_fit(np.asarray([SEQ + 1]), [0], SEQ)
    with pytest.raises(ValueError, match="shard_index"):
        make_loader(synthetic(3), 1, SEQ, shard_index=2, shard_count=2)


def test_pack_examples_and_pad_fallback(stories_dir):
    from transformers import AutoTokenizer

    examples = synthetic(10, seed=7)
    packed = pack_examples(examples, SEQ, pad_id=PAD)
    assert packed["input_ids"].shape[1] == SEQ
    assert int(packed["loss_mask"].sum()) == sum(int(ex["loss_mask"].sum()) for ex in examples)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    assert tok.pad_token_id is None and pad_id_for(tok) == tok.eos_token_id == 2
    tok.pad_token = "<unk>"
    assert pad_id_for(tok) == 0
