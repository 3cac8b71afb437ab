"""A task domain the bundled stories260K model can live in: short stories with verifiable constraints.

A 260K-parameter model trained on TinyStories writes simple stories and cannot write instructions, so its
tasks are composed, not generated: a premise from `domains/stories_seed.jsonl` ("a little dog named Max who
finds a red ball", labelled with a task type) plus constraints phrased in plain words and checked by the
IFEval checkers under IFEval ids (use a word, avoid a word, say the name N times, fewer than N sentences,
end with a phrase). The model partly satisfies each when sampled, so resampling and verification keep some
of its own stories for every kind, and tuning on them can teach the mapping from constraint to story.

The seed file has a `split` per premise: `train` premises feed generation, `eval` premises make the frozen
evaluation prompts `domains/stories_eval.jsonl` (`compose_tasks` over the eval premises, seed 1234, 160
tasks, up to two constraints each).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from jaxtune.curate.constraints import Kind, draws, phrase
from jaxtune.jsonl import read_jsonl

DOMAINS = Path(__file__).resolve().parent / "domains"
SEEDS = DOMAINS / "stories_seed.jsonl"
EVAL = DOMAINS / "stories_eval.jsonl"
TEMPLATE = "Write a short story about {premise}."

_NAME = re.compile(r"\bnamed ([A-Z][a-z]+)")


KINDS: dict[str, Kind] = {
    "keywords:existence": Kind('Use the word "{v}".', ("happy", "big", "friend", "play", "smile", "tree", "sun",
                                                        "toy", "park", "mom"),
                               lambda v, _: {"keywords": [v]}),
    "keywords:forbidden_words": Kind('Do not use the word "{v}".', ("big", "happy", "saw", "wanted", "very", "said"),
                                     lambda v, _: {"forbidden_words": [v]}),
    "keywords:frequency": Kind("Say the name {name} at least {v} times.", (2, 3, 4),
                               lambda v, name: {"keyword": name, "frequency": v, "relation": "at least"},
                               needs_name=True),
    "length_constraints:number_sentences": Kind("Use fewer than {v} sentences.", (6, 8, 10, 12),
                                                lambda v, _: {"num_sentences": v, "relation": "less than"}),
    "startend:end_checker": Kind('End the story with the words "{v}"', ("happily ever after.", "every day.",
                                                                         "The end.", "a lot of fun."),
                                 lambda v, _: {"end_phrase": v}),
}


@dataclass(frozen=True)
class Premise:
    text: str
    task_type: str
    split: str

    @property
    def name(self) -> str | None:
        m = _NAME.search(self.text)
        return m.group(1) if m else None


def load_premises(path: str | Path = SEEDS, split: str | None = None) -> list[Premise]:
    """Premises of one split (all when None); a record missing a field is named by file and line."""
    out = []
    for line, rec in read_jsonl(path):
        for field in ("premise", "task_type", "split"):
            if not isinstance(rec.get(field), str) or not rec[field].strip():
                raise ValueError(f"{path}:{line}: field {field!r} must be a non-empty string")
        if split is None or rec["split"] == split:
            out.append(Premise(rec["premise"], rec["task_type"], rec["split"]))
    return out


def compose_tasks(premises: list[Premise], n: int, *, seed: int = 0, max_constraints: int = 1,
                  kind_counts: dict[str, int] | None = None, type_counts: dict[str, int] | None = None,
                  key_prefix: str = "story") -> list[dict]:
    """`n` task records in IFEval's layout (`key`, `prompt`, `instruction_id_list`, `kwargs`) plus
    `task_type`. `kind_counts` / `type_counts` fix how many tasks get each first constraint / task type (an
    allocation; they must sum to `n`); further constraints (up to `max_constraints`) are drawn at random among
    kinds not yet used. Deterministic in `seed`."""
    if not premises:
        raise ValueError("no premises to compose tasks from")
    rng = random.Random(seed)
    types = sorted({p.task_type for p in premises})
    by_type = {t: [p for p in premises if p.task_type == t] for t in types}
    firsts = draws(kind_counts, list(KINDS), n, rng)
    task_types = draws(type_counts, types, n, rng)
    tasks = []
    for i, (first, task_type) in enumerate(zip(firsts, task_types)):
        options = by_type[task_type]
        if KINDS[first].needs_name:
            options = [p for p in options if p.name] or [p for p in premises if p.name]
        premise = rng.choice(options)
        ids = [first]
        extra = [k for k in KINDS if k != first and (premise.name or not KINDS[k].needs_name)]
        ids += rng.sample(extra, rng.randint(0, min(max_constraints - 1, len(extra))))
        phrases, kwargs = zip(*(phrase(KINDS[k], rng, premise.name) for k in ids))
        tasks.append({"key": f"{key_prefix}-{i:05d}", "prompt": " ".join([TEMPLATE.format(premise=premise.text),
                                                                           *phrases]),
                      "instruction_id_list": ids, "kwargs": list(kwargs), "task_type": task_type})
    return tasks
