"""Dataset statistics: records, turns, task-type mix, token lengths, truncation and packing at a seq_len.

`compute_stats` returns plain numbers (JSON-able); `format_stats` turns them into the text the CLI prints.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from jaxtune.data.formats import Conversation
from jaxtune.data.packing import efficiency, first_fit
from jaxtune.data.report import RecordError, Report
from jaxtune.data.tokenize import adds_bos, tokenize_conversation

HIST_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def length_histogram(lengths: np.ndarray) -> list[tuple[str, int]]:
    """Counts per power-of-two bucket, labelled like '128-255'."""
    edges = np.asarray(HIST_EDGES + (np.iinfo(np.int64).max,))
    counts = np.histogram(lengths, bins=edges)[0] if lengths.size else np.zeros(len(edges) - 1, int)
    labels = [f"{a}-{b - 1}" for a, b in zip(HIST_EDGES[:-1], HIST_EDGES[1:])] + [f"{HIST_EDGES[-1]}+"]
    return [(label, int(c)) for label, c in zip(labels, counts)]


def _summary(values: np.ndarray) -> dict:
    if not values.size:
        return {}
    return {"min": int(values.min()), "p50": float(np.percentile(values, 50)), "mean": float(values.mean()),
            "p95": float(np.percentile(values, 95)), "max": int(values.max()), "total": int(values.sum())}


def compute_stats(convs: list[Conversation], report: Report, *, tokenizer=None, template: str | None = None,
                  seq_len: int = 512, train_on: str = "assistant", end_token: str | None = None) -> dict:
    roles = Counter(m["role"] for c in convs for m in c.messages)
    stats = {
        "records": report.records_in, "valid_records": report.records_out, "format": report.format,
        "skipped": dict(report.skipped), "conversations": len(convs),
        "plain_text": sum(c.text is not None for c in convs),
        "roles": dict(roles),
        "assistant_turns": _summary(np.asarray([sum(m["role"] == "assistant" for m in c.messages)
                                                for c in convs if c.text is None], np.int64)),
        "categories": dict(Counter(c.meta["category"] for c in convs if "category" in c.meta).most_common()),
    }
    if tokenizer is None:
        return stats
    bos = adds_bos(tokenizer)
    lengths, targets, errors = [], [], Counter()
    for conv in convs:
        try:
            ids, mask = tokenize_conversation(conv, tokenizer, template, train_on, end_token=end_token, bos=bos)
        except RecordError as err:
            errors[err.kind] += 1
            continue
        lengths.append(ids.size - 1)
        targets.append(int(mask[1:].sum()))
    lengths_arr = np.asarray(lengths, np.int64)
    fitted = np.minimum(lengths_arr, seq_len)
    stats.update({
        "seq_len": seq_len, "tokenize_errors": dict(errors), "tokens": _summary(lengths_arr),
        "target_tokens": _summary(np.asarray(targets, np.int64)), "histogram": length_histogram(lengths_arr),
        "over_seq_len": int((lengths_arr > seq_len).sum()),
        "packing_efficiency": efficiency(fitted, first_fit(fitted, range(fitted.size), seq_len), seq_len)
        if fitted.size else 0.0,
        "padded_efficiency": float(fitted.mean() / seq_len) if fitted.size else 0.0,
    })
    return stats


def _fmt_summary(d: dict) -> str:
    return (f"min {d['min']}, median {d['p50']:.0f}, mean {d['mean']:.1f}, p95 {d['p95']:.0f}, max {d['max']}, "
            f"total {d['total']}") if d else "-"


def format_stats(stats: dict) -> str:
    lines = [f"records: {stats['records']} ({stats['valid_records']} valid, format {stats['format']})",
             f"conversations: {stats['conversations']}" + (f" ({stats['plain_text']} plain text)"
                                                           if stats["plain_text"] else "")]
    if stats["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())))
    if stats["roles"]:
        lines.append("messages by role: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["roles"].items())))
        lines.append(f"assistant turns per conversation: {_fmt_summary(stats['assistant_turns'])}")
    if stats["categories"]:
        lines.append("task types (category):")
        lines += [f"  {k}: {v}" for k, v in stats["categories"].items()]
    if "tokens" not in stats:
        return "\n".join(lines)
    lines.append(f"tokens per example (inputs after shift): {_fmt_summary(stats['tokens'])}")
    lines.append(f"trained tokens per example: {_fmt_summary(stats['target_tokens'])}")
    if stats["tokenize_errors"]:
        lines.append("tokenization errors: " + ", ".join(f"{k}: {v}" for k, v in stats["tokenize_errors"].items()))
    top = max((c for _, c in stats["histogram"]), default=0) or 1
    lines.append("length histogram:")
    lines += [f"  {label:>10} {count:7d} {'#' * round(40 * count / top)}" for label, count in stats["histogram"]]
    lines.append(f"longer than seq_len {stats['seq_len']}: {stats['over_seq_len']} (truncated or dropped in "
                 "training)")
    lines.append(f"slot efficiency at seq_len {stats['seq_len']}: packed {stats['packing_efficiency']:.1%}, "
                 f"padded {stats['padded_efficiency']:.1%}")
    return "\n".join(lines)
