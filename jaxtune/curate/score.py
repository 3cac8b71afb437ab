"""Model-based scores of a conversation's last response: perplexity and instruction-following difficulty.

IFD (Li et al. 2024, "From Quantity to Quality") is the response's mean cross-entropy given its instruction
divided by its mean cross-entropy alone. Near 1 the instruction barely helps predict the response; above 1 it
hurts, which marks a mismatched or noisy pair. Every sequence goes through one jitted forward over
fixed-shape batches, with log-softmax in fp32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.curate.report import CurateReport
from jaxtune.data.chat import resolve_template
from jaxtune.data.formats import Conversation
from jaxtune.data.report import RecordError
from jaxtune.data.tokenize import adds_bos, tokenize_conversation

_MIN_BUCKET = 16


@dataclass(frozen=True)
class ResponseScore:
    """Mean cross-entropy of the response with (`ce_cond`) and without (`ce_uncond`) its conversation, over
    the same `n_tokens` tokens; `ppl = exp(ce_cond)`, `ifd = ce_cond / ce_uncond`."""

    ce_cond: float
    ce_uncond: float
    ppl: float
    ifd: float
    n_tokens: int


def response_sequences(conv: Conversation, tokenizer, template: str, *, end_token: str | None = None,
                       bos: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(cond_ids, cond_mask, uncond_ids, uncond_mask)`: mask[i] = 1 where token i is scored.

    Conditioned: the conversation rendered with `template` (Jinja text), scored on the last assistant turn
    as training with `train_on: last_turn` would (its end token included). Unconditioned: BOS (when the
    tokenizer adds BOS by default) followed by the response's token ids copied from the conditioned
    sequence, so both score identical tokens. Without BOS the first response token has no context, so it
    is scored on neither side.
    """
    bos = adds_bos(tokenizer) if bos is None else bos
    ids, mask = tokenize_conversation(conv, tokenizer, template, "last_turn", end_token=end_token, bos=bos)
    mask = mask.copy()
    mask[0] = 0  # the first token is never predicted
    response = ids[mask == 1]
    if bos:
        uncond = np.concatenate([np.asarray([tokenizer.bos_token_id], np.int32), response])
        uncond_mask = np.concatenate([np.zeros(1, np.int32), np.ones(response.size, np.int32)])
    else:
        if response.size < 2:
            raise RecordError(conv.source, "messages", "the response is one token and the tokenizer adds no "
                              "BOS, so nothing can be scored without context", "response too short to score")
        uncond = response
        uncond_mask = np.concatenate([np.zeros(1, np.int32), np.ones(response.size - 1, np.int32)])
        mask[np.flatnonzero(mask)[0]] = 0
    return ids, mask, uncond.astype(np.int32), uncond_mask


@functools.partial(jax.jit, static_argnums=0)
def _row_nll(graphdef, state, batch: dict) -> jax.Array:
    """Summed next-token NLL per row over `loss_mask`; padding rows and positions count nothing."""
    model = nnx.merge(graphdef, state)
    logits = model(batch["input_ids"], batch["segment_ids"], batch["positions"]).astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(jnp.where(batch["loss_mask"] > 0, nll, 0.0), axis=1)


def _bucket(n: int, seq_len: int) -> int:
    """The padded length for a batch whose longest row has `n` inputs: a power of two, at most seq_len,
    so a whole dataset compiles a handful of shapes."""
    return min(seq_len, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))


def sequence_nlls(model, seqs: list[tuple[np.ndarray, np.ndarray]], *, seq_len: int,
                  batch_size: int) -> np.ndarray:
    """Summed NLL of each `(ids, mask)` sequence (mask[i] = 1: token i is scored), at most seq_len + 1
    tokens. Rows are sorted by length and padded to `[batch_size, bucket]`."""
    graphdef, state = nnx.split(model)
    out = np.zeros(len(seqs), np.float64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        t = _bucket(max(len(seqs[i][0]) - 1 for i in chunk), seq_len)
        batch = {k: np.zeros((batch_size, t), np.int32)
                 for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
        for r, i in enumerate(chunk):
            ids, mask = seqs[i]
            n = len(ids) - 1
            batch["input_ids"][r, :n], batch["targets"][r, :n] = ids[:-1], ids[1:]
            batch["loss_mask"][r, :n], batch["segment_ids"][r, :n] = mask[1:], 1
            batch["positions"][r, :n] = np.arange(n)
        nll = np.asarray(_row_nll(graphdef, state, batch))
        out[chunk] = nll[:len(chunk)]
    return out


def response_scores(model, tokenizer, convs: list[Conversation], *, template: str | None = None,
                    end_token: str | None = None, seq_len: int = 512, batch_size: int = 8,
                    report: CurateReport | None = None) -> list[ResponseScore | None]:
    """Score the last assistant response of each conversation (see `response_sequences` for exactly which
    tokens). `template` is the chat template spec: None for the tokenizer's own, a built-in name or a
    .jinja file. A record that cannot be scored (longer than `seq_len`, plain text with no instruction, a
    template error) gets None; with `report`, it is rejected there, counted by reason ("not scored (…)").
    Logits are cast to fp32; load the model in fp32 (`load_pretrained`'s default) for an fp32 forward.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: need seq_len >= 2 and batch_size >= 1")
    jinja = resolve_template(template, tokenizer)
    bos = adds_bos(tokenizer)
    seqs, slots, reasons = [], [], {}
    for k, conv in enumerate(convs):
        try:
            if conv.text is not None:
                raise RecordError(conv.source, "text", "plain text has no instruction to condition on",
                                  "plain text")
            cond, cond_mask, uncond, uncond_mask = response_sequences(conv, tokenizer, jinja,
                                                                      end_token=end_token, bos=bos)
        except RecordError as err:
            reasons[k] = (err.kind, err.short())
            continue
        if cond.size > seq_len + 1:
            reasons[k] = ("longer than seq_len", f"{cond.size} tokens, more than seq_len {seq_len} holds")
            continue
        slots.append((k, int(cond_mask.sum())))
        seqs += [(cond, cond_mask), (uncond, uncond_mask)]
    nll = sequence_nlls(model, seqs, seq_len=seq_len, batch_size=batch_size) if seqs else np.zeros(0)
    scores: list[ResponseScore | None] = [None] * len(convs)
    for j, (k, n) in enumerate(slots):
        ce_cond, ce_uncond = nll[2 * j] / n, nll[2 * j + 1] / n
        scores[k] = ResponseScore(ce_cond=float(ce_cond), ce_uncond=float(ce_uncond),
                                  ppl=math.exp(min(ce_cond, 700.0)),
                                  ifd=float(ce_cond / ce_uncond) if ce_uncond > 0 else math.inf, n_tokens=n)
    if report is not None:
        for k, (kind, detail) in reasons.items():
            report.reject(f"not scored ({kind})", convs[k].source, detail, convs[k])
    return scores


def distribution(values) -> dict:
    """n, mean, median, p10 and p90 of finite `values` (what a report shows of a score)."""
    arr = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if not arr.size:
        return {"n": 0}
    p10, median, p90 = np.percentile(arr, [10, 50, 90])
    return {"n": int(arr.size), "mean": round(float(arr.mean()), 4), "median": round(float(median), 4),
            "p10": round(float(p10), 4), "p90": round(float(p90), 4)}
