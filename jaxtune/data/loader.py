"""Resumable, shardable batch iteration over packed examples, built on a grain MapDataset.

Every epoch's row plan is a pure function of (lengths, seed, epoch), planned up front over the *global*
data, so every host counts the same steps (multi-host runs stay in lockstep) and takes its own slice of
each global batch. Batch `k` is a pure function of `k`, so grain's iterator state (the next index) is all
a checkpoint needs to resume on exactly the batches an uninterrupted run would have seen. Shapes never
change: a short last batch is filled with padding rows (loss mask 0), so the step never recompiles.
Packing is planned here rather than by grain's FirstFitPackIterDataset so that the step count is known
before training (for schedules) and the over-length policy has already been applied and counted.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from jaxtune.data.packing import build_batch, efficiency, plan_rows


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Example order of one epoch: a fresh permutation per (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class Loader:
    """Iterator of `{input_ids, targets, loss_mask, segment_ids, positions}` int32 `[batch_size, seq_len]`.

    `batch_size` is rows per host per step; the global batch is `batch_size * shard_count` rows.
    Use `get_state()`/`set_state()` to checkpoint and resume; `total_steps` and `epoch_steps` size schedules.
    """

    def __init__(self, examples, batch_size: int, seq_len: int, *, packing: bool = True, seed: int = 0,
                 num_epochs: int = 1, shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = False,
                 pad_id: int = 0, shuffle: bool = True, num_threads: int = 2, prefetch: int = 4):
        if batch_size < 1 or seq_len < 1 or num_epochs < 1:
            raise ValueError(f"batch_size ({batch_size}), seq_len ({seq_len}) and num_epochs ({num_epochs}) "
                             "must be positive")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        if not examples:
            raise ValueError("no examples to load")
        self.examples = examples
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.shard_index, self.shard_count = shard_index, shard_count
        self.lengths = np.asarray([ex["input_ids"].shape[0] for ex in examples], np.int64)
        self.epoch_rows = [plan_rows(self.lengths, epoch_order(len(examples), seed, e, shuffle), seq_len, packing)
                           for e in range(num_epochs)]
        per_step = batch_size * shard_count
        count = (lambda n: n // per_step) if drop_remainder else (lambda n: math.ceil(n / per_step))
        self.epoch_steps = tuple(count(len(rows)) for rows in self.epoch_rows)
        self.total_steps = sum(self.epoch_steps)
        if self.total_steps == 0:
            raise ValueError(f"{len(self.epoch_rows[0])} rows make no full global batch of {per_step} "
                             "with drop_remainder=True")
        self._epoch_start = np.cumsum((0,) + self.epoch_steps)
        self.fingerprint = hashlib.sha256(repr((
            self.lengths.tobytes(), batch_size, seq_len, packing, seed, num_epochs, shard_count, drop_remainder,
            shuffle)).encode()).hexdigest()[:16]
        import grain

        dataset = grain.MapDataset.range(self.total_steps).map(self.batch_at)
        self._dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
        self._iter = iter(self._dataset)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the first epoch (later epochs differ by a step or so when packing reshuffles)."""
        return self.epoch_steps[0]

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row slots over all epochs' rows (padding rows of short batches not counted)."""
        rows = [r for epoch in self.epoch_rows for r in epoch]
        return efficiency(self.lengths, rows, self.seq_len)

    def epoch_of(self, step: int) -> int:
        return int(np.searchsorted(self._epoch_start, step, side="right") - 1)

    def rows_at(self, step: int) -> list[np.ndarray]:
        """This host's planned rows (example indices) of global step `step`."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        epoch = self.epoch_of(step)
        k = step - int(self._epoch_start[epoch])
        first = (k * self.shard_count + self.shard_index) * self.batch_size
        return self.epoch_rows[epoch][first:first + self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        return build_batch(self.examples, self.rows_at(int(step)), self.batch_size, self.seq_len, self.pad_id)

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """JSON-able: grain's iterator state plus a fingerprint of data and settings."""
        return {"grain": self._iter.get_state(), "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("data loader state was saved for other data or loader settings (fingerprint "
                             f"{state.get('fingerprint')} != {self.fingerprint}); resume with the same data, "
                             "seed, batch size, seq_len, packing, epochs and shard count")
        self._iter.set_state(state["grain"])


def make_loader(dataset_examples, batch_size: int, seq_len: int, packing: bool = True, seed: int = 0,
                num_epochs: int = 1, shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = False,
                *, pad_id: int = 0, shuffle: bool = True) -> Loader:
    """Batches of shifted examples (dicts of `input_ids`/`targets`/`loss_mask`) for training or evaluation."""
    return Loader(dataset_examples, batch_size, seq_len, packing=packing, seed=seed, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count, drop_remainder=drop_remainder,
                  pad_id=pad_id, shuffle=shuffle)


def pad_id_for(tokenizer) -> int:
    """Token id for padding slots: pad, else eos (stories260K has no pad), else 0. Masked out either way."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
