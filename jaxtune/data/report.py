"""Accounting for the data pipeline: per-record errors and the counts a run reports.

Every record that does not reach a batch is either an error (on_error: raise) or a counted skip with its
reason and a line in the rejects file (on_error: skip); truncation and drops are counted too, so a report's
numbers always add up to what went in. A run saves its report as `data_report.json` and refuses to start when
the losses pass the recipe's ceilings (`prepare.check_ceilings`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


class RecordError(ValueError):
    """One bad record: where it is (file:line or file:row N), which field, what is wrong."""

    def __init__(self, source: str, field_name: str | None, detail: str, kind: str):
        self.source = source
        self.field_name = field_name
        self.detail = detail
        self.kind = kind
        super().__init__(
            f"{source}: {self.short()}. Fix the record, or set data.on_error: skip to skip bad records "
            "(they are counted and written to a rejects file).")

    def short(self) -> str:
        """The message without the how-to-fix tail, for summaries and rejects files."""
        field_part = f" ({self.field_name})" if self.field_name else ""
        return f"{self.kind}{field_part}: {self.detail}"


@dataclass
class Report:
    """Counts from records in to examples out; `summary()` is what a user reads after loading."""

    records_in: int = 0
    records_out: int = 0
    format: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0
    truncated_tokens: int = 0  # tokens cut off the end of truncated examples
    truncated_targets: int = 0  # of those, tokens that would have been trained on
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    target_tokens: int = 0
    rejects_path: str | None = None
    cache_hit: bool = False

    def skip(self, kind: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def merge(self, other: "Report") -> "Report":
        """Sum of two reports (train + validation); the format is kept when both agree."""
        return Report(
            records_in=self.records_in + other.records_in,
            records_out=self.records_out + other.records_out,
            format=self.format if self.format == other.format else "mixed",
            skipped=dict(Counter(self.skipped) + Counter(other.skipped)),
            examples_in=self.examples_in + other.examples_in,
            examples_out=self.examples_out + other.examples_out,
            truncated=self.truncated + other.truncated,
            truncated_tokens=self.truncated_tokens + other.truncated_tokens,
            truncated_targets=self.truncated_targets + other.truncated_targets,
            dropped=dict(Counter(self.dropped) + Counter(other.dropped)),
            tokens=self.tokens + other.tokens,
            target_tokens=self.target_tokens + other.target_tokens,
            rejects_path=self.rejects_path or other.rejects_path,
            cache_hit=self.cache_hit and other.cache_hit,
        )

    def lost(self) -> dict[str, int]:
        """Every record or example that never reaches a batch, by reason: invalid records (skipped) and
        examples the over-length policy dropped."""
        lost = {f"invalid record: {k}": v for k, v in self.skipped.items()}
        for reason, n in self.dropped.items():
            lost[reason] = lost.get(reason, 0) + n
        return dict(sorted(lost.items()))

    def units(self) -> int:
        """What could have become an example: invalid records plus every tokenized conversation (a record
        holding several conversations counts once per conversation); the records read, before tokenization."""
        if not self.examples_in:
            return self.records_in
        return self.records_in - self.records_out + self.examples_in

    def dropped_fraction(self) -> float:
        return sum(self.lost().values()) / max(self.units(), 1)

    def truncated_fraction(self) -> float:
        return self.truncated / max(self.examples_in, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        return cls(**d)

    def summary(self) -> str:
        """A short block: what was read, what was lost and why, what was cut, where the rejects are."""
        lines = [f"records: {self.records_in} read, {self.records_out} valid"
                 + (f" (format {self.format})" if self.format else "")]
        if self.examples_in:
            lines.append(f"examples: {self.examples_in} tokenized, {self.examples_out} kept")
        if self.skipped:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            lines.append(f"skipped: {sum(self.skipped.values())} invalid records ({kinds})")
        if self.dropped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()))
            lines.append(f"dropped: {sum(self.dropped.values())} ({reasons})")
        if self.skipped or self.dropped:
            lines.append(f"dropped or skipped: {sum(self.lost().values())} of {self.units()} "
                         f"({self.dropped_fraction():.1%})")
        if self.truncated:
            lines.append(f"truncated: {self.truncated} of {self.examples_in} ({self.truncated_fraction():.1%}), "
                         f"{self.truncated_tokens} tokens cut ({self.truncated_targets} trained)")
        if self.rejects_path:
            lines.append(f"rejected records in {self.rejects_path}")
        if self.tokens:
            lines.append(f"tokens: {self.tokens} ({self.target_tokens} with loss)")
        if self.cache_hit:
            lines.append("tokenized data read from cache")
        return "\n".join(lines)


def write_rejects(path: str | Path, rejects: list[tuple[RecordError, object]]) -> Path:
    """One JSON line per rejected record: where, why, and the record itself when it is JSON-able."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for err, record in rejects:
            try:
                rec = json.loads(json.dumps(record, default=str))
            except (TypeError, ValueError):
                rec = repr(record)
            f.write(json.dumps({"source": err.source, "kind": err.kind, "field": err.field_name,
                                "error": err.short(), "record": rec}) + "\n")
    return path
