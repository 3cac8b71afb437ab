"""Dataset statistics: records, turns, task-type mix, token lengths, truncation and packing at a seq_len, and
the invalid records by file:line.

`file_stats` reads a file and returns plain numbers (JSON-able) and the rejects; `format_stats` turns the
numbers into the text the CLI prints. Records are counted as training counts them (`data/report.py`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from jaxtune.data.formats import Conversation, read_records
from jaxtune.data.packing import efficiency, first_fit
from jaxtune.data.report import RecordError, Report, write_rejects
from jaxtune.data.tokenize import adds_bos, fit_counted, tokenize_conversation

HIST_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SHOWN_INVALID = 5  # invalid records listed in the text output; --rejects writes all of them


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


def compute_stats(convs: list[Conversation], report: Report, rejects: list | None = None, *, tokenizer=None,
                  template: str | None = None, seq_len: int = 512, train_on: str = "assistant",
                  end_token: str | None = None, overlong: str = "truncate") -> dict:
    """Statistics of `convs`; with a tokenizer, tokenization failures, drops and truncation at `seq_len` are
    counted into `report` (and the failures appended to `rejects`) exactly as training counts them."""
    roles = Counter(m["role"] for c in convs for m in c.messages)
    stats = {
        "records": report.records_in, "valid_records": report.records_out, "format": report.format,
        "conversations": len(convs), "plain_text": sum(c.text is not None for c in convs),
        "roles": dict(roles),
        "assistant_turns": _summary(np.asarray([sum(m["role"] == "assistant" for m in c.messages)
                                                for c in convs if c.text is None], np.int64)),
        "categories": dict(Counter(c.meta["category"] for c in convs if "category" in c.meta).most_common()),
    }
    if tokenizer is not None:
        stats.update(_token_stats(convs, report, rejects if rejects is not None else [], tokenizer, template,
                                  seq_len, train_on, end_token, overlong))
    stats.update({"skipped": dict(report.skipped), "invalid": sum(report.skipped.values()),
                  "lost": report.lost(), "truncated": report.truncated,
                  "truncated_tokens": report.truncated_tokens, "truncated_targets": report.truncated_targets})
    return stats


def _token_stats(convs, report: Report, rejects: list, tokenizer, template, seq_len, train_on, end_token,
                 overlong) -> dict:
    bos = adds_bos(tokenizer)
    lengths, targets = [], []
    for conv in convs:
        report.examples_in += 1
        try:
            ids, mask = tokenize_conversation(conv, tokenizer, template, train_on, end_token=end_token, bos=bos)
        except RecordError as err:
            report.skip(err.kind)
            rejects.append((err, {"text": conv.text} if conv.text is not None else {"messages": conv.messages}))
            continue
        lengths.append(ids.size - 1)
        targets.append(int(mask[1:].sum()))
        if fit_counted(ids, mask, seq_len, overlong, report)[0] is not None:
            report.examples_out += 1
    lengths_arr = np.asarray(lengths, np.int64)
    fitted = np.minimum(lengths_arr, seq_len)
    return {
        "seq_len": seq_len, "tokens": _summary(lengths_arr),
        "target_tokens": _summary(np.asarray(targets, np.int64)), "histogram": length_histogram(lengths_arr),
        "over_seq_len": int((lengths_arr > seq_len).sum()),
        "packing_efficiency": efficiency(fitted, first_fit(fitted, range(fitted.size), seq_len), seq_len)
        if fitted.size else 0.0,
        "padded_efficiency": float(fitted.mean() / seq_len) if fitted.size else 0.0,
    }


def file_stats(path: str, *, fmt: str = "auto", columns: dict | None = None, rejects_path: str | None = None,
               **token_opts) -> tuple[dict, Report]:
    """Statistics of a data file (`token_opts`: `compute_stats`'s tokenizer, template, seq_len, ...). Every
    invalid record is counted; the first few are listed under `invalid_records`, all go to `rejects_path`."""
    convs, report, rejects = read_records(path, fmt=fmt, columns=columns, on_error="skip")
    stats = compute_stats(convs, report, rejects, **token_opts)
    stats["invalid_records"] = [{"source": err.source, "error": err.short()} for err, _ in rejects[:SHOWN_INVALID]]
    if rejects and rejects_path:
        report.rejects_path = str(write_rejects(rejects_path, rejects))
    return stats, report


def invalid_error(stats: dict, report: Report) -> str | None:
    """The one line that makes `data stats` fail when any record is invalid (as training would), or None."""
    if not stats["invalid"]:
        return None
    first = stats["invalid_records"][0]
    where = (f"all are in {report.rejects_path}" if report.rejects_path
             else "pass --rejects FILE to write all of them")
    return (f"{stats['invalid']} of {report.units()} records are invalid (first: {first['source']}: "
            f"{first['error']}); {where}, or train with data.on_error: skip to drop them")


def _fmt_summary(d: dict) -> str:
    return (f"min {d['min']}, median {d['p50']:.0f}, mean {d['mean']:.1f}, p95 {d['p95']:.0f}, max {d['max']}, "
            f"total {d['total']}") if d else "-"


def format_stats(stats: dict) -> str:
    lines = [f"records: {stats['records']} ({stats['valid_records']} valid, format {stats['format']})",
             f"conversations: {stats['conversations']}" + (f" ({stats['plain_text']} plain text)"
                                                           if stats["plain_text"] else "")]
    if stats["roles"]:
        lines.append("messages by role: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["roles"].items())))
        lines.append(f"assistant turns per conversation: {_fmt_summary(stats['assistant_turns'])}")
    if stats["categories"]:
        lines.append("task types (category):")
        lines += [f"  {k}: {v}" for k, v in stats["categories"].items()]
    if "tokens" in stats:
        lines += _format_tokens(stats)
    if stats["lost"]:
        lines.append(f"dropped in training: {sum(stats['lost'].values())} ("
                     + ", ".join(f"{k}: {v}" for k, v in stats["lost"].items()) + ")")
    if stats["truncated"]:
        lines.append(f"truncated: {stats['truncated']} ({stats['truncated_tokens']} tokens cut, "
                     f"{stats['truncated_targets']} trained)")
    if stats["invalid"]:
        lines.append(f"invalid records: {stats['invalid']} (the first {len(stats['invalid_records'])}; --rejects "
                     "FILE writes them all)")
        lines += [f"  {r['source']}: {r['error']}" for r in stats["invalid_records"]]
    return "\n".join(lines)


def _format_tokens(stats: dict) -> list[str]:
    lines = [f"tokens per example (inputs after shift): {_fmt_summary(stats['tokens'])}",
             f"trained tokens per example: {_fmt_summary(stats['target_tokens'])}"]
    top = max((c for _, c in stats["histogram"]), default=0) or 1
    lines.append("length histogram:")
    lines += [f"  {label:>10} {count:7d} {'#' * round(40 * count / top)}" for label, count in stats["histogram"]]
    lines.append(f"longer than seq_len {stats['seq_len']}: {stats['over_seq_len']} (truncated or dropped in "
                 "training)")
    lines.append(f"slot efficiency at seq_len {stats['seq_len']}: packed {stats['packing_efficiency']:.1%}, "
                 f"padded {stats['padded_efficiency']:.1%}")
    return lines
