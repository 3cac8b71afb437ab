"""Loss and perplexity of a model on a text file, an instruction dataset, or token sequences.

Everything becomes fixed-shape `[batch, seq_len]` rows in the training batch layout and goes through the
training loop's jitted `eval_step`, so evaluation reports the same NLL the trainer optimises and compiles once
per shape. Partial last batches are padded with empty rows (mask 0), which count nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class LossResult:
    """Token-averaged NLL over every loss token, its exp, and next-token argmax accuracy."""

    loss: float
    perplexity: float
    accuracy: float
    tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=8)
def _eval_fn(mesh, loss_chunk):
    from jaxtune.train.step import jit_eval_step

    return jit_eval_step(mesh=mesh, loss_chunk=loss_chunk)


def evaluate_loss(model, batches: Iterable[dict], *, mesh=None, loss_chunk: int | None = None) -> LossResult:
    """Sum NLL, correct predictions and loss tokens over `batches` (numpy dicts of BATCH_KEYS)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    step = _eval_fn(mesh, loss_chunk)
    nll = correct = n = 0.0
    for batch in batches:
        out = step(graphdef, lora, rest, {k: batch[k] for k in BATCH_KEYS})
        nll += float(out["nll_sum"])
        correct += float(out["correct_sum"])
        n += float(out["loss_tokens"])
    if n == 0:
        raise ValueError("no loss tokens to evaluate: the data is empty or every target is masked")
    loss = nll / n
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), accuracy=correct / n, tokens=int(n))


def batches_of(rows: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Split `[N, T]` rows into `[batch_size, T]` batches; the last one is topped up with empty rows."""
    n = rows["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        chunk = {k: rows[k][start:start + batch_size] for k in BATCH_KEYS}
        short = batch_size - chunk["input_ids"].shape[0]
        if short:
            chunk = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in chunk.items()}
        yield chunk


def sequence_rows(seqs: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
    """One row per token sequence (cut to `seq_len + 1` tokens): predict every token after the first."""
    rows = {k: np.zeros((len(seqs), seq_len), np.int32) for k in BATCH_KEYS}
    for r, seq in enumerate(seqs):
        seq = np.asarray(seq[: seq_len + 1], np.int32)
        n = len(seq) - 1
        if n < 1:
            raise ValueError(f"sequence {r} has {len(seq)} token(s); at least 2 are needed to score one")
        rows["input_ids"][r, :n] = seq[:-1]
        rows["targets"][r, :n] = seq[1:]
        rows["loss_mask"][r, :n] = 1
        rows["segment_ids"][r, :n] = 1
        rows["positions"][r, :n] = np.arange(n)
    return rows


def text_windows(ids: Sequence[int], seq_len: int, bos_id: int | None = None,
                 max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows over one long token stream so each token is scored exactly once.

    With a BOS id every window is `[BOS] + seq_len tokens` (the model sees a document start, as in
    pretraining); without one, windows overlap by the single context token that predicts the next window."""
    ids = list(ids)
    out = []
    for start in range(0, max(len(ids) - (bos_id is None), 0), seq_len):
        if max_windows is not None and len(out) >= max_windows:
            break
        if bos_id is not None:
            window = [bos_id] + ids[start:start + seq_len]
        else:
            window = ids[start:start + seq_len + 1]
        if len(window) >= 2:
            out.append(window)
    return out


def read_text_slice(path: str | Path, start: int = 0, n_chars: int | None = None) -> str:
    """A fixed character slice of a UTF-8 text file (a stable held-out set)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if start >= len(text):
        raise ValueError(f"{path}: start offset {start} is past the end of the file ({len(text)} characters)")
    return text[start:] if n_chars is None else text[start:start + n_chars]


def text_loss(model, tokenizer, text: str, *, seq_len: int = 256, batch_size: int = 8,
              max_windows: int | None = None, mesh=None) -> LossResult:
    """Perplexity of raw text, windowed by `text_windows`."""
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    windows = text_windows(ids, seq_len, tokenizer.bos_token_id, max_windows)
    if not windows:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    return evaluate_loss(model, batches_of(sequence_rows(windows, seq_len), batch_size), mesh=mesh)


def examples_loss(model, examples: Sequence[dict], *, seq_len: int, batch_size: int = 8, pad_id: int = 0,
                  packing: bool = False, mesh=None) -> LossResult:
    """Loss on shifted examples from the data pipeline (`prepare_dataset`), laid out as training lays them out."""
    from jaxtune.data.packing import pack_examples

    if not examples:
        raise ValueError("no examples to evaluate")
    rows = pack_examples(examples, seq_len, packing=packing, pad_id=pad_id)
    return evaluate_loss(model, batches_of(rows, batch_size), mesh=mesh)


def dataset_loss(model, tokenizer, path: str, *, seq_len: int = 512, batch_size: int = 8,
                 chat_template: str | None = None, train_on: str = "assistant", fmt: str = "auto",
                 packing: bool = False, max_examples: int | None = None, mesh=None) -> LossResult:
    """Loss on an instruction/chat dataset file, tokenized and masked exactly as training would."""
    from jaxtune.data.config import DataConfig
    from jaxtune.data.loader import pad_id_for
    from jaxtune.data.prepare import prepare_dataset

    cfg = DataConfig(train=path, format=fmt, chat_template=chat_template, train_on=train_on, seq_len=seq_len,
                     packing=packing, cache_dir=None)
    examples, _, _ = prepare_dataset(cfg, tokenizer)
    return examples_loss(model, examples[:max_examples], seq_len=seq_len, batch_size=batch_size,
                         pad_id=pad_id_for(tokenizer), packing=packing, mesh=mesh)


def sequence_losses(model, seqs: Sequence[Sequence[int]], seq_len: int, *, mesh=None) -> list[float]:
    """Mean NLL of each token sequence on its own (one row per call, one compile), for per-item intervals."""
    return [evaluate_loss(model, batches_of(sequence_rows([s], seq_len), 1), mesh=mesh).loss for s in seqs]
