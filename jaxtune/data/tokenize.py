"""Token ids and loss masks for one conversation, target shifting, and the over-length policy.

The rendered text is tokenized once with character offsets; a token is trained on when its characters
overlap an assistant span from `chat.render_with_spans`. The template writes its own BOS (Llama 3) or none
(Qwen); the tokenizer's automatic BOS is added only when the tokenizer adds one by default and the template
did not, so there is never a second BOS.
"""

from __future__ import annotations

import numpy as np

from jaxtune.data.chat import render_with_spans, require_template
from jaxtune.data.formats import Conversation
from jaxtune.data.report import RecordError, Report

TRAIN_ON = ("assistant", "all", "last_turn")
OVERLONG = ("truncate", "drop")


def spans_to_mask(offsets: np.ndarray, spans, n_tokens: int) -> np.ndarray:
    """1 for each token whose [start, end) characters overlap any span."""
    mask = np.zeros(n_tokens, np.int32)
    if n_tokens == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, end in spans:
        mask |= ((starts < end) & (ends > start)).astype(np.int32)
    return mask


def adds_bos(tokenizer) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS (Llama, stories260K do; Qwen does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def end_token_id(tokenizer, end_token: str | None) -> int | None:
    """Id of the end-of-response token: `data.end_token` if set, else the tokenizer's eos."""
    if not end_token:
        return getattr(tokenizer, "eos_token_id", None)
    ids = tokenizer(end_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"data.end_token {end_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


def _encode(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError as e:
        raise ValueError("loss masks need a fast (Rust `tokenizers`) tokenizer with offset mapping; "
                         f"{type(tokenizer).__name__} has none") from e
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    return ids, offsets


def tokenize_text(conv: Conversation, tokenizer, *, end_token: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain text: BOS as the tokenizer adds it, the text, the end token; every token is a target."""
    ids = list(tokenizer(conv.text, add_special_tokens=True, verbose=False)["input_ids"])
    end = end_token_id(tokenizer, end_token)
    if end is not None and (not ids or ids[-1] != end):
        ids.append(end)
    arr = np.asarray(ids, np.int32)
    if arr.size < 2:
        raise RecordError(conv.source, "text", "fewer than 2 tokens, nothing to predict", "no trainable tokens")
    return arr, np.ones_like(arr)


def tokenize_conversation(conv: Conversation, tokenizer, template: str | None, train_on: str = "assistant", *,
                          end_token: str | None = None, bos: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, loss_mask)` int32, aligned per token (mask[i] = 1: token i is a training target).

    `bos` says whether the tokenizer adds BOS by default (computed when None; pass it in loops).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if conv.text is not None:
        return tokenize_text(conv, tokenizer, end_token=end_token)
    rendered = render_with_spans(conv, tokenizer, require_template(template, tokenizer), end_token=end_token)
    if not rendered.spans:
        raise RecordError(conv.source, "messages", "no assistant turn to train on", "turn order")
    ids, offsets = _encode(tokenizer, rendered.text)
    if train_on == "all":
        spans = [(0, len(rendered.text))]
    elif train_on == "last_turn":
        spans = [rendered.spans[-1][1:]]
    else:
        spans = [s[1:] for s in rendered.spans]
    mask = spans_to_mask(offsets, spans, ids.size)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if (adds_bos(tokenizer) if bos is None else bos) and (ids.size == 0 or ids[0] != bos_id):
        ids = np.concatenate([np.asarray([bos_id], np.int32), ids])
        mask = np.concatenate([np.zeros(1, np.int32), mask])
    if not mask[1:].any():
        raise RecordError(conv.source, "messages", "no token is trained on (the loss mask is all zero)",
                          "no trainable tokens")
    return ids, mask


def fit_length(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str):
    """Apply the over-length policy to a token sequence that must fit `seq_len` inputs after shifting.

    Returns `(ids, mask, outcome)`: outcome "ok", "truncated" (prompt head kept, response cut), or a drop
    reason with `ids`/`mask` None.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, not {overlong!r}")
    limit = seq_len + 1
    if ids.size <= limit:
        return ids, mask, "ok"
    if overlong == "drop":
        return None, None, "longer than seq_len"
    ids, mask = ids[:limit], mask[:limit]
    if not mask[1:].any():
        return None, None, "prompt fills seq_len"
    return ids, mask, "truncated"


def fit_counted(ids: np.ndarray, mask: np.ndarray, seq_len: int, overlong: str, report: Report):
    """`fit_length`, counted in `report`: a drop by its reason, a truncation with the tokens it cut.
    Returns `(ids, mask)`, both None when dropped."""
    fit_ids, fit_mask, outcome = fit_length(ids, mask, seq_len, overlong)
    if fit_ids is None:
        report.drop(outcome)
    elif outcome == "truncated":
        report.truncated += 1
        report.truncated_tokens += int(ids.size - fit_ids.size)
        report.truncated_targets += int(mask[fit_ids.size:].sum())
    return fit_ids, fit_mask


def shift(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example next-token targets, before packing, so no example predicts its neighbour's first token."""
    return {"input_ids": ids[:-1].astype(np.int32), "targets": ids[1:].astype(np.int32),
            "loss_mask": mask[1:].astype(np.int32)}
