"""Grounded hallucination: does a model's answer about a short story stay inside the story?

Each record gives a story (`context`), a `question` about it, the gold `answer` and its `aliases`, and a
`kind` (name, object, place, ending, ...) for per-kind rates. The prompt is the story, a blank line, the
question and `Answer:`, which reads as a story continuation to a plain LM and as a user turn to a chat model.

The answer is the response's first sentence or line. Its *content words* are its words that are not in
`STOPWORDS`; a content word is *supported* when it occurs in the story or in the question (echoing the
question invents nothing), after the normalisation of `jaxtune.eval.hallucination` (case, punctuation,
possessive 's, plural s). Per record: `correct` (the gold answer or an alias occurs in the answer),
`hallucinated` (at least one unsupported content word, listed), `faithful` (a non-empty answer with nothing
unsupported) and `empty`. The test is lexical: a paraphrase with a word the story lacks ("went" for
"walked") counts as unsupported, so `faithful` is strict, and it is strict the same way for base and tuned.

`grounded_stories_v1.jsonl` is versioned by name: edit a copy (`_v2`), never v1, so results stay comparable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxtune.eval.hallucination import (
    HallucinationDataError,
    Metric,
    answer_of,
    by_kind,
    contains_phrase,
    evaluate,
    format_table,
    forms,
    ordered_responses,
    rates,
    require_str,
    require_words,
    unique_id,
    words,
)
from jaxtune.jsonl import read_jsonl

DEFAULT_DATA = Path(__file__).resolve().parent / "probes" / "grounded_stories_v1.jsonl"

# Function words, auxiliaries and naming words, normalised as `words` writes them ("don't" → "dont"):
# they carry no claim about the story, so they need no support in it.
STOPWORDS = frozenset((
    "a", "an", "the", "and", "or", "but", "so", "nor", "if", "then", "than", "because", "as", "while", "until",
    "though", "although",
    "i", "me", "my", "mine", "myself", "you", "your", "yours", "yourself", "he", "him", "his", "himself", "she",
    "her", "hers", "herself", "it", "its", "itself",
    "we", "us", "our", "ours", "ourselves", "they", "them", "their", "theirs", "themselves",
    "this", "that", "these", "those", "there", "here", "what", "which", "who", "whom", "whose", "when", "where",
    "why", "how",
    "is", "am", "are", "was", "were", "be", "been", "being", "do", "does", "did", "done", "doing", "have", "has",
    "had", "having",
    "will", "would", "shall", "should", "can", "could", "may", "might", "must",
    "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt", "wont", "wouldnt", "shouldnt",
    "hasnt", "havent", "hadnt",
    "im", "ive", "youre", "youve", "youd", "youll", "hes", "shes", "theyre", "theyve", "theyd", "theyll", "weve",
    "lets", "thats", "theres",
    "to", "of", "in", "on", "at", "by", "for", "from", "with", "without", "into", "onto", "about", "after", "before",
    "over", "under", "up", "down", "out", "off",
    "around", "through", "across", "along", "near", "behind", "between", "inside", "outside", "upon",
    "not", "no", "yes", "very", "too", "also", "just", "only", "even", "again", "all", "some", "any", "each", "every",
    "both", "more", "most", "much", "many",
    "other", "such", "own", "same", "now", "once", "ever", "never", "always", "still", "yet", "oh", "okay", "ok",
    "really",
    "named", "called", "name",
))

METRICS = (
    Metric("hallucination", "hallucinated"),
    Metric("faithful", "faithful"),
    Metric("correct", "correct"),
    Metric("empty", "empty"),
)


def load_grounded(path: str | os.PathLike | None = None) -> list[dict]:
    """Records `{id, context, question, answer, aliases, kind}` from a JSONL file (default: the packaged
    stories); a bad record raises `HallucinationDataError` naming file:line and field."""
    path = Path(path) if path is not None else DEFAULT_DATA
    records, seen = [], set()
    for n, rec in read_jsonl(path, HallucinationDataError):
        where = f"{path}:{n}"
        rid = unique_id(rec, seen, where)
        aliases = rec.get("aliases", [])
        if aliases is None:
            aliases = []
        if not isinstance(aliases, list):
            raise HallucinationDataError(f"{where}: field 'aliases' must be a list of strings")
        for i, alias in enumerate(aliases):
            if not isinstance(alias, str):
                raise HallucinationDataError(f"{where}: field 'aliases' item {i} must be a string")
            require_words(alias, f"aliases[{i}]", where)
        kind = rec.get("kind", "other")
        if not isinstance(kind, str) or not kind.strip():
            raise HallucinationDataError(f"{where}: field 'kind' must be a non-empty string")
        records.append({
            "id": rid,
            "context": require_str(rec, "context", where),
            "question": require_str(rec, "question", where),
            "answer": require_words(require_str(rec, "answer", where), "answer", where),
            "aliases": list(aliases),
            "kind": kind,
        })
    if not records:
        raise HallucinationDataError(f"{path}: no records")
    return records


def grounded_prompt(record: Mapping) -> str:
    """The story, a blank line, then `Question: ...` and `Answer:` on their own lines."""
    return f"{record['context'].strip()}\n\nQuestion: {record['question'].strip()}\nAnswer:"


def content_words(text: str) -> list[str]:
    """The normalised words of `text` that are not stopwords, in order."""
    return [w for w in words(text) if w not in STOPWORDS]


def score_record(record: Mapping, response: str) -> dict:
    """One row: the answer, its unsupported content words, and the correct/hallucinated/faithful/empty flags."""
    answer = answer_of(response)
    support = frozenset().union(*(forms(w) for w in words(record["context"] + "\n" + record["question"])))
    unsupported = list(dict.fromkeys(w for w in content_words(answer) if forms(w).isdisjoint(support)))
    matched = next((g for g in (record["answer"], *record["aliases"]) if contains_phrase(answer, g)), None)
    empty = not words(answer)
    return {"id": record["id"], "kind": record["kind"], "question": record["question"],
            "gold": record["answer"], "response": response, "answer": answer, "correct": matched is not None,
            "matched": matched, "hallucinated": bool(unsupported), "unsupported": unsupported,
            "faithful": not empty and not unsupported, "empty": empty}


def score_grounded(records: Sequence[Mapping], responses: Mapping[str, str] | Sequence[str]) -> dict:
    """`{"task", "n", "rates", "by_kind", "rows"}`: each metric of `METRICS` as a Wilson-interval rate over
    all records and per kind, and one row per record (kept for pairing base with tuned)."""
    rows = [score_record(r, text) for r, text in zip(records, ordered_responses(records, responses))]
    return {"task": "grounded", "n": len(rows), "rates": rates(rows, METRICS), "by_kind": by_kind(rows, METRICS),
            "rows": rows}


def evaluate_grounded(models: Mapping[str, object], tokenizer, records: Sequence[Mapping], *,
                      template: str | None, max_new_tokens: int, batch_size: int = 8,
                      extra_stop_ids: Sequence[int] = ()) -> dict:
    """Prompt each named model (`base`, `tuned`, ...) with every record, greedily, and score the responses;
    with both `base` and `tuned` the document holds their paired comparison."""
    doc = evaluate(models, tokenizer, [grounded_prompt(r) for r in records],
                   lambda responses: score_grounded(records, responses), METRICS, template=template,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, extra_stop_ids=extra_stop_ids)
    return {"task": "grounded", "n": len(records), **doc}


def format_report(doc: dict) -> str:
    """The headline rates side by side, then the hallucination rate per kind."""
    lines = [f"grounded hallucination: {doc['n']} questions", format_table(doc, METRICS), "", "hallucination by kind:"]
    for side, scored in doc["sides"].items():
        cells = ", ".join(f"{kind} {100 * r['hallucination']['value']:.0f}% (n={r['hallucination']['n']})"
                          for kind, r in scored["by_kind"].items())
        lines.append(f"  {side}: {cells}")
    return "\n".join(lines)
