"""What the grounded and closed-book hallucination evals share: word normalisation, the answer a response
gives, rates over rows with their Wilson intervals, base-vs-tuned pairing, and running models on prompts.

A response's *answer* is its first sentence or line: what a model claims first is what it claims; text it
rambles on with afterwards (a story model's continuation, a chat model's elaboration) is not scored.
Words are compared after normalisation (case-folded, punctuation dropped, a possessive 's removed,
numbers up to twenty spelled out), and a word matches another when one is the other's plural ("dogs",
"boxes", "ponies"). The comparison is lexical on purpose: no model judges the judge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jaxtune import stats
from jaxtune.files import write_text_atomic


class HallucinationDataError(ValueError):
    """A malformed grounded or closed-book data file; the message names the file, line and field."""


_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
            "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
_APOSTROPHE = re.compile("[\u2018\u2019\u02bc]")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s|\n")
ARTICLES = frozenset({"a", "an", "the"})


def words(text: str) -> list[str]:
    """Normalised words: case-folded, punctuation gone, "Tom's" → "tom", "don't" → "dont", "4" → "four"."""
    out = []
    for w in _WORD.findall(_APOSTROPHE.sub("'", text.casefold())):
        w = w.removesuffix("'s").replace("'", "")
        out.append(_NUMBERS[int(w)] if w.isdecimal() and len(w) <= 2 and int(w) < len(_NUMBERS) else w)
    return out


def forms(word: str) -> frozenset[str]:
    """`word` and the stems a plural ending could hide: "boxes" → {boxes, boxe, box}."""
    out = {word}
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        out.add(word[:-1])
        if word.endswith("es"):
            out.add(word[:-2])
        if word.endswith("ies"):
            out.add(word[:-3] + "y")
    return frozenset(out)


def same_word(a: str, b: str) -> bool:
    """Normalised words that are equal or one the plural of the other."""
    return a == b or not forms(a).isdisjoint(forms(b))


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as consecutive normalised words, articles ignored on both sides."""
    hay = [w for w in words(text) if w not in ARTICLES]
    needle = [w for w in words(phrase) if w not in ARTICLES]
    if not needle:
        return False
    return any(all(same_word(h, n) for h, n in zip(hay[i:i + len(needle)], needle))
               for i in range(len(hay) - len(needle) + 1))


def answer_of(response: str) -> str:
    """The answer a response gives: its first sentence or line, trimmed."""
    text = response.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""


def ordered_responses(records: Sequence[dict], responses: Mapping[str, str] | Sequence[str]) -> list[str]:
    """One response per record, in record order: `responses` is in that order or maps record id → text."""
    if isinstance(responses, Mapping):
        missing = [r["id"] for r in records if r["id"] not in responses]
        if missing:
            raise HallucinationDataError(f"no response for records {missing[:5]}; key responses by record id")
        out = [responses[r["id"]] for r in records]
    else:
        out = list(responses)
        if len(out) != len(records):
            raise HallucinationDataError(f"got {len(out)} responses for {len(records)} records; give one per record")
    bad = next((i for i, r in enumerate(out) if not isinstance(r, str)), None)
    if bad is not None:
        raise HallucinationDataError(f"response {bad} (record {records[bad]['id']!r}) is {type(out[bad]).__name__}, "
                                     "not text")
    return out


def require_str(rec: dict, field: str, where: str) -> str:
    value = rec.get(field)
    if not isinstance(value, str) or not value.strip():
        raise HallucinationDataError(f"{where}: field '{field}' must be a non-empty string")
    return value


def require_words(value: str, field: str, where: str) -> str:
    if not [w for w in words(value) if w not in ARTICLES]:
        raise HallucinationDataError(f"{where}: field '{field}' ({value!r}) has no words to match")
    return value


def unique_id(rec: dict, seen: set, where: str) -> str:
    rid = require_str(rec, "id", where)
    if rid in seen:
        raise HallucinationDataError(f"{where}: duplicate id {rid!r}; ids must be unique")
    seen.add(rid)
    return rid


# ---------------------------------------------------------------------------------------------- rates


@dataclasses.dataclass(frozen=True)
class Metric:
    """A rate over rows: the share of rows in its population (`where`) whose `flag` is true."""

    name: str
    flag: str
    where: Callable[[dict], bool] = lambda row: True
    of: str = "all records"


def rates(rows: Sequence[dict], metrics: Sequence[Metric]) -> dict:
    """`{metric name: Estimate dict}`, each a Wilson interval over its own population of rows."""
    out = {}
    for m in metrics:
        pop = [row for row in rows if m.where(row)]
        out[m.name] = stats.rate(sum(bool(row[m.flag]) for row in pop), len(pop)).to_dict()
    return out


def by_kind(rows: Sequence[dict], metrics: Sequence[Metric], key: str = "kind") -> dict:
    """`{kind: {metric name: Estimate dict}}` over the rows of each kind."""
    return {k: rates([r for r in rows if r[key] == k], metrics) for k in sorted({r[key] for r in rows})}


def compare(base: Sequence[dict], tuned: Sequence[dict], metrics: Sequence[Metric], *, n_boot: int = 2000,
            seed: int = 0) -> dict:
    """`{metric name: {"base", "tuned", "difference"}}`: both rates and tuned − base paired over the same
    records (a 0/1 flag per record, bootstrap over records)."""
    if [r["id"] for r in base] != [r["id"] for r in tuned]:
        raise ValueError("base and tuned were scored on different records; pair them one to one")
    out = {}
    for m in metrics:
        pairs = [(b, t) for b, t in zip(base, tuned) if m.where(t)]
        diff = stats.paired_difference([float(bool(b[m.flag])) for b, _ in pairs],
                                       [float(bool(t[m.flag])) for _, t in pairs], n_boot=n_boot, seed=seed)
        out[m.name] = {"base": rates(base, [m])[m.name], "tuned": rates(tuned, [m])[m.name],
                       "difference": diff.to_dict()}
    return out


def format_table(doc: dict, metrics: Sequence[Metric]) -> str:
    """The rates of each side, and with two sides their paired difference in points, one metric a line."""
    sides = list(doc["sides"])
    lines = [f"{'metric':<24}" + "".join(f"{side:<30}" for side in sides)
             + ("Δ tuned − base" if "comparison" in doc else "")]
    for m in metrics:
        cells = "".join(f"{stats.fmt_rate(doc['sides'][s]['rates'][m.name]):<30}" for s in sides)
        delta = doc.get("comparison", {}).get(m.name, {}).get("difference")
        lines.append(f"{m.name:<24}{cells}" + (stats.fmt_points(delta) if delta else ""))
    lines.append("(" + "; ".join(f"{m.name}: of {m.of}" for m in metrics) + ")")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- running


def evaluate(models: Mapping[str, object], tokenizer, prompts: Sequence[str],
             score: Callable[[Sequence[str]], dict], metrics: Sequence[Metric], *, template: str | None,
             max_new_tokens: int, batch_size: int, extra_stop_ids: Sequence[int] = ()) -> dict:
    """Greedy responses of each named model (e.g. `base`, `tuned`) to the same prompts, scored by `score`;
    `{"sides": {side: scored}, "comparison": ...}`, the comparison present when there are `base` and `tuned`."""
    from jaxtune.eval.compare import respond
    from jaxtune.generate import stop_token_ids

    first = next(iter(models.values()))
    stop_ids = stop_token_ids(first.config, tokenizer, template, extra=extra_stop_ids)
    sides = {side: score(respond(model, tokenizer, prompts, template=template, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, stop_ids=stop_ids))
             for side, model in models.items()}
    doc = {"sides": sides}
    if "base" in sides and "tuned" in sides:
        doc["comparison"] = compare(sides["base"]["rows"], sides["tuned"]["rows"], metrics)
    return doc


def write_result(doc: dict, out_dir: str | os.PathLike, name: str) -> Path:
    """`out_dir/<name>.json`: settings, every side's rates and rows (with responses), and the comparison."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_text_atomic(Path(out_dir) / f"{name}.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
