"""What a curation stage did: records in, and how many each named check rejected, with examples.

Each item is rejected by the first check it fails, and checks run in a fixed order, so the counts read as a
pipeline: the records into a check are those out of the check before it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Reject:
    """One rejected item: which check, where it came from, why, and the item (conversation, text or record)."""

    check: str
    source: str
    detail: str
    item: object = None


@dataclass
class CurateReport:
    stage: str
    records_in: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # check name -> count, in check order
    notes: dict[str, object] = field(default_factory=dict)  # other counts (or small dicts of them) worth reporting
    rejects: list[Reject] = field(default_factory=list)

    def declare(self, *checks: str) -> None:
        """List checks up front so ones that reject nothing still show, in order."""
        for name in checks:
            self.rejected.setdefault(name, 0)

    def reject(self, check: str, source: str, detail: str, item=None) -> None:
        self.rejected[check] = self.rejected.get(check, 0) + 1
        self.rejects.append(Reject(check, source, detail, item))

    @property
    def records_out(self) -> int:
        return self.records_in - sum(self.rejected.values())

    def steps(self) -> list[tuple[str, int, int]]:
        """(check, records in, records out) per check, in order."""
        out, n = [], self.records_in
        for name, count in self.rejected.items():
            out.append((name, n, n - count))
            n -= count
        return out

    def examples(self, n: int = 3) -> dict[str, list[Reject]]:
        ex: dict[str, list[Reject]] = {}
        for r in self.rejects:
            if len(ex.setdefault(r.check, [])) < n:
                ex[r.check].append(r)
        return ex

    def summary(self, n_examples: int = 2) -> str:
        lines = [f"{self.stage}: {self.records_in} in, {self.records_out} out"]
        examples = self.examples(n_examples)
        for name, n_in, n_out in self.steps():
            lines.append(f"  {name:<28} {n_in:>7} -> {n_out:<7} (-{n_in - n_out})")
            for r in examples.get(name, []):
                lines.append(f"      e.g. {r.source}: {r.detail}: {_preview(r.item)!r}")
        lines += [f"  {k}: {_note(v)}" for k, v in self.notes.items()]
        return "\n".join(lines)

    def to_dict(self, n_examples: int = 3) -> dict:
        return {
            "stage": self.stage, "records_in": self.records_in, "records_out": self.records_out,
            "steps": [{"check": c, "in": i, "out": o} for c, i, o in self.steps()], "notes": dict(self.notes),
            "examples": {c: [{"source": r.source, "detail": r.detail, "preview": _preview(r.item)} for r in rs]
                         for c, rs in self.examples(n_examples).items()},
        }


def write_rejects(reports: list[CurateReport], path: str | Path) -> Path:
    """Every rejected item as one JSON line: stage, check, source, detail and the item itself."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for report in reports:
            for r in report.rejects:
                item = dataclasses.asdict(r.item) if dataclasses.is_dataclass(r.item) else r.item
                f.write(json.dumps({"stage": report.stage, "check": r.check, "source": r.source,
                                    "detail": r.detail, "item": item}, ensure_ascii=False, default=str) + "\n")
    return path


def _note(value) -> str:
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def _preview(item, width: int = 80) -> str:
    """A short look at a rejected item: the last assistant turn of a conversation, or the text itself."""
    if hasattr(item, "messages"):
        turns = [m.get("content") or "" for m in item.messages if m["role"] == "assistant"]
        item = item.text if item.text is not None else (turns[-1] if turns else "")
    elif isinstance(item, dict):
        item = " | ".join(f"{k}: {v}" for k, v in item.items() if v)
    text = " ".join(str(item or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"
