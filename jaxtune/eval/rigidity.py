"""Over-rigidity probe: prompts whose format and content constraints pull against each other.

A tuned model can learn a house style (long markdown lists, sections, sign-offs) so well that it keeps it
when a prompt also asks for something that style crowds out (a word limit, a forbidden word, a language).
Each probe in `probes/over_rigidity_v1.jsonl` states both sides as IFEval instruction ids with kwargs, so
the IFEval checkers verify them, and a response falls in exactly one category: both satisfied, only the
format side, only the content side, or neither. A rise in `format_only` after tuning is the rigidity signal.

The probe file is versioned by name: edit a copy (`over_rigidity_v2.jsonl`), never v1, so that results
recorded against v1 stay comparable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtune.eval.ifeval import IFEvalDataError
from jaxtune.eval.ifeval_checks import check_instruction, check_instruction_loose, validate_instruction
from jaxtune.jsonl import read_jsonl

PROBES_DIR = Path(__file__).resolve().parent / "probes"
DEFAULT_PROBES = PROBES_DIR / "over_rigidity_v1.jsonl"
CATEGORIES = ("both", "format_only", "content_only", "neither")


@dataclasses.dataclass(frozen=True)
class Expectation:
    instruction_id: str
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Probe:
    id: str
    prompt: str
    format: tuple[Expectation, ...]
    content: tuple[Expectation, ...]
    tension: str = ""


def _parse_side(record: dict, side: str, where: str) -> tuple[Expectation, ...]:
    items = record.get(side)
    if not isinstance(items, list) or not items:
        raise IFEvalDataError(f"{where}: field '{side}' must be a non-empty list of {{instruction_id, kwargs}}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("instruction_id"), str):
            raise IFEvalDataError(f"{where}: {side}[{i}] needs a string 'instruction_id'")
        kwargs = item.get("kwargs") or {}
        try:
            validate_instruction(item["instruction_id"], kwargs)
        except ValueError as e:
            raise IFEvalDataError(f"{where}: {side}[{i}]: {e}") from None
        out.append(Expectation(item["instruction_id"], dict(kwargs)))
    return tuple(out)


def load_probes(path: str | os.PathLike | None = None) -> list[Probe]:
    """Probes from a JSONL file (default: the packaged v1 set); every expectation is validated."""
    path = Path(path) if path is not None else DEFAULT_PROBES
    probes, seen = [], set()
    for n, rec in read_jsonl(path, IFEvalDataError):
        where = f"{path}:{n}"
        for field in ("id", "prompt"):
            if not isinstance(rec.get(field), str) or not rec[field]:
                raise IFEvalDataError(f"{where}: field '{field}' must be a non-empty string")
        if rec["id"] in seen:
            raise IFEvalDataError(f"{where}: duplicate probe id {rec['id']!r}; ids must be unique")
        seen.add(rec["id"])
        probes.append(
            Probe(
                id=rec["id"],
                prompt=rec["prompt"],
                format=_parse_side(rec, "format", where),
                content=_parse_side(rec, "content", where),
                tension=rec.get("tension", ""),
            )
        )
    return probes


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    id: str
    response: str
    format_checks: list[bool]
    content_checks: list[bool]

    @property
    def category(self) -> str:
        fmt, content = all(self.format_checks), all(self.content_checks)
        if fmt and content:
            return "both"
        if fmt:
            return "format_only"
        return "content_only" if content else "neither"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "category": self.category}


def score_probe(probe: Probe, response: str, loose: bool = False) -> ProbeResult:
    """Check both sides of one probe (strict IFEval checking unless `loose`)."""
    check = check_instruction_loose if loose else check_instruction
    return ProbeResult(
        id=probe.id,
        response=response,
        format_checks=[check(e.instruction_id, e.kwargs, probe.prompt, response) for e in probe.format],
        content_checks=[check(e.instruction_id, e.kwargs, probe.prompt, response) for e in probe.content],
    )


@dataclasses.dataclass(frozen=True)
class RigidityResult:
    probe_set: str
    loose: bool
    counts: dict[str, int]
    fractions: dict[str, float | None]
    rows: list[ProbeResult]

    def summary(self) -> dict:
        return {"probe_set": self.probe_set, "loose": self.loose, "counts": self.counts, "fractions": self.fractions}

    def to_dict(self) -> dict:
        return {**self.summary(), "rows": [row.to_dict() for row in self.rows]}


def score_rigidity(
    probes: Sequence[Probe],
    responses: dict[str, str] | Sequence[str],
    loose: bool = False,
    probe_set: str = DEFAULT_PROBES.stem,
) -> RigidityResult:
    """Categorise each probe's response; `responses` maps probe prompt (or id) to text, or is in probe order."""
    if isinstance(responses, dict):
        missing = [p.id for p in probes if p.prompt not in responses and p.id not in responses]
        if missing:
            raise IFEvalDataError(f"no response for probes {missing}; key responses by probe prompt or id")
        ordered = [responses.get(p.prompt, responses.get(p.id)) for p in probes]
    else:
        ordered = list(responses)
        if len(ordered) != len(probes):
            raise IFEvalDataError(f"got {len(ordered)} responses for {len(probes)} probes; give one per probe")
    rows = [score_probe(p, r, loose) for p, r in zip(probes, ordered)]
    counts = {c: sum(row.category == c for row in rows) for c in CATEGORIES}
    fractions = {c: (counts[c] / len(rows) if rows else None) for c in CATEGORIES}
    return RigidityResult(probe_set=probe_set, loose=loose, counts=counts, fractions=fractions, rows=rows)


def format_report(result: RigidityResult) -> str:
    n = sum(result.counts.values())
    lines = [f"probe set: {result.probe_set}  probes: {n}  scoring: {'loose' if result.loose else 'strict'}"]
    for c in CATEGORIES:
        frac = result.fractions[c]
        lines.append(f"{c:<14}{result.counts[c]:>4}  {'n/a' if frac is None else f'{100 * frac:6.2f} %'}")
    return "\n".join(lines)
