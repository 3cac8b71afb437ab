"""Decontamination: drop training records whose text overlaps evaluation prompts by word n-grams.

A record's overlap with a reference set is the fraction of its distinct word n-grams (`similarity.words`,
so case and punctuation are ignored) that occur in any reference of the set. A record shorter than n words
is one gram, its whole word sequence, found when that sequence appears contiguously in a reference. The
instruction (with its input) and the response are checked separately; either can be contaminated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from jaxtune.curate import records
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import shingles, words
from jaxtune.data.formats import Conversation
from jaxtune.data.readers import iter_records
from jaxtune.data.report import RecordError

PROMPT_FIELDS = ("prompt", "instruction")


class NgramIndex:
    """Word n-grams of reference texts, each mapped to the references that contain it."""

    def __init__(self, texts: Sequence[str], n: int = 8):
        if n < 1:
            raise ValueError(f"n-gram size {n} must be at least 1")
        self.n, self.texts = n, list(texts)
        self._grams: dict[str, list[int]] = {}
        self._joined: list[str] = []
        self._by_word: dict[str, set[int]] = {}
        for i, text in enumerate(self.texts):
            tokens = words(text)
            self._joined.append(f" {' '.join(tokens)} ")
            for tok in tokens:
                self._by_word.setdefault(tok, set()).add(i)
            if len(tokens) >= n:
                for gram in shingles(tokens, n):
                    self._grams.setdefault(gram, []).append(i)

    def __len__(self) -> int:
        return len(self.texts)

    def _containing(self, tokens: list[str]) -> list[int]:
        """References holding `tokens` as a contiguous run (for a text shorter than n words)."""
        candidates = set.intersection(*(self._by_word.get(t, set()) for t in tokens))
        run = f" {' '.join(tokens)} "
        return sorted(i for i in candidates if run in self._joined[i])

    def overlap(self, text: str) -> tuple[float, int | None]:
        """(fraction of `text`'s n-grams found in the references, the reference holding most of them),
        or (0.0, None) when none is found or `text` has no words."""
        tokens = words(text)
        if not tokens:
            return 0.0, None
        if len(tokens) < self.n:
            hits = self._containing(tokens)
            return (1.0, hits[0]) if hits else (0.0, None)
        grams = shingles(tokens, self.n)
        found = [g for g in grams if g in self._grams]
        if not found:
            return 0.0, None
        votes = Counter(i for g in found for i in self._grams[g])
        best = min(votes, key=lambda i: (-votes[i], i))
        return len(found) / len(grams), best


def _sides(conv: Conversation) -> list[tuple[str, str]]:
    """The texts checked: the instruction with its input, and the responses."""
    if conv.text is not None:
        return [("text", conv.text)]
    return [("prompt", records.prompt(conv)), ("response", "\n".join(records.responses(conv)))]


def check_name(name: str) -> str:
    return f"contaminated: overlaps {name} split"


def decontaminate(convs: list[Conversation], references: dict[str, list[str]], report: CurateReport, *,
                  n: int = 8, threshold: float = 0.5) -> list[Conversation]:
    """Drop each record whose overlap with any reference set reaches `threshold`, counted under the set it
    overlaps most; the notes give, per set, how many records overlapped at all and the largest overlap."""
    if not 0 < threshold <= 1:
        raise ValueError(f"decontamination threshold {threshold} must be in (0, 1]")
    indexes = {name: NgramIndex(texts, n) for name, texts in references.items()}
    report.declare(*(check_name(name) for name in indexes))
    any_overlap, most = Counter(), {name: 0.0 for name in indexes}
    kept = []
    for conv in convs:
        worst = None  # (fraction, set name, side, reference index)
        for name, index in indexes.items():
            hit = max(((*index.overlap(text), side) for side, text in _sides(conv)), key=lambda h: h[0])
            if hit[0] > 0:
                any_overlap[name] += 1
                most[name] = max(most[name], hit[0])
            if hit[0] >= threshold and (worst is None or hit[0] > worst[0]):
                worst = (hit[0], name, hit[2], hit[1])
        if worst is None:
            kept.append(conv)
            continue
        frac, name, side, ref = worst
        preview = " ".join(indexes[name].texts[ref].split())[:60]
        report.reject(check_name(name), conv.source, f"{side} shares {frac:.0%} of its {n}-grams with {name} "
                      f"prompt {ref + 1} ({preview!r})", conv)
    for name in indexes:
        report.notes[f"overlap with {name}"] = {"records": any_overlap[name], "max": round(most[name], 4)}
    return kept


def load_reference_prompts(path: str | Path) -> list[str]:
    """The prompts of an evaluation file (JSON or JSONL): each record's `prompt` or `instruction` field."""
    out = []
    for source, record in iter_records(path):
        fields = record if isinstance(record, dict) else {}
        text = next((fields[k] for k in PROMPT_FIELDS if isinstance(fields.get(k), str)), None)
        if text is None:
            why = (record.short() if isinstance(record, RecordError)
                   else f"no {' or '.join(PROMPT_FIELDS)} string field to decontaminate against")
            raise ValueError(f"{source}: {why}")
        out.append(text)
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def load_references(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """Reference sets from files, each named by its file stem (which must be unique)."""
    refs: dict[str, list[str]] = {}
    for path in paths:
        name = Path(path).stem
        if name in refs:
            raise ValueError(f"{path}: two reference files are named {name!r}; rename one")
        refs[name] = load_reference_prompts(path)
    return refs
