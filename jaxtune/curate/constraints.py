"""Verifiable constraints on generated tasks: a catalogue of kinds (how a constraint is phrased, which
IFEval checker verifies it), attaching them to instructions, and verifying a response against its own.

Task records use IFEval's layout (`prompt`, `instruction_id_list`, `kwargs`), so the checks in
`eval/ifeval_checks.py` verify generated data and evaluation prompts alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from jaxtune.eval.ifeval_checks import check_instruction, validate_instruction


@dataclass(frozen=True)
class Kind:
    """One constraint kind: how it is phrased (`{v}` a value, `{name}` a character's name) and the IFEval
    kwargs its check takes."""

    phrase: str
    values: tuple
    kwargs: Callable[[object, str | None], dict]
    needs_name: bool = False


# For instructions of any kind (Self-Instruct with an assistant teacher).
GENERIC: dict[str, Kind] = {
    "length_constraints:number_words": Kind("Answer in fewer than {v} words.", (50, 80, 120, 200),
                                            lambda v, _: {"num_words": v, "relation": "less than"}),
    "length_constraints:number_sentences": Kind("Use at most {v} sentences.", (3, 5, 8),
                                                lambda v, _: {"num_sentences": v + 1, "relation": "less than"}),
    "detectable_format:number_bullet_lists": Kind("Answer with exactly {v} markdown bullet points such as:\n* item",
                                                  (2, 3, 4), lambda v, _: {"num_bullets": v}),
    "detectable_format:title": Kind("Give your answer a title wrapped in double angular brackets, such as "
                                    "<<my title>>.", (None,), lambda v, _: {}),
    "change_case:english_lowercase": Kind("Write your entire answer in lowercase letters; no capital letters are "
                                          "allowed.", (None,), lambda v, _: {}),
    "punctuation:no_comma": Kind("Do not use any commas in your answer.", (None,), lambda v, _: {}),
    "startend:end_checker": Kind('Finish your answer with the exact phrase "{v}". No other words should follow it.',
                                 ("Is there anything else I can help with?", "Hope this helps."),
                                 lambda v, _: {"end_phrase": v}),
    "detectable_content:postscript": Kind("At the end of your answer, add a postscript starting with {v}",
                                          ("P.S.",), lambda v, _: {"postscript_marker": v}),
    "detectable_format:json_format": Kind("Wrap your entire output in JSON format.", (None,), lambda v, _: {}),
}


def phrase(kind: Kind, rng: random.Random, name: str | None = None) -> tuple[str, dict]:
    """(the sentence asking for it, the kwargs that verify it) for one random value of `kind`."""
    v = rng.choice(kind.values)
    return kind.phrase.format(v=v, name=name), kind.kwargs(v, name)


def draws(counts: dict[str, int] | None, options: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` labels: exactly `counts[x]` of each when given (shuffled), else uniform draws."""
    if counts is None:
        return [rng.choice(options) for _ in range(n)]
    unknown = sorted(set(counts) - set(options))
    if unknown:
        raise ValueError(f"allocation names {unknown}, which this catalogue does not have (it has {options})")
    if sum(counts.values()) != n:
        raise ValueError(f"the allocation sums to {sum(counts.values())}, not the {n} tasks asked for")
    labels = [x for x in options for _ in range(counts.get(x, 0))]
    rng.shuffle(labels)
    return labels


def attach_constraints(instructions: list[str], catalogue: dict[str, Kind], *, seed: int = 0,
                       counts: dict[str, int] | None = None, max_constraints: int = 1,
                       key_prefix: str = "task") -> list[dict]:
    """One task record per instruction with 1..`max_constraints` constraints appended, the first as
    `counts` allocates (kinds needing a character's name are not used here)."""
    rng = random.Random(seed)
    options = [k for k, kind in catalogue.items() if not kind.needs_name]
    firsts = draws(counts, options, len(instructions), rng)
    tasks = []
    for i, (text, first) in enumerate(zip(instructions, firsts)):
        others = [k for k in options if k != first]
        ids = [first, *rng.sample(others, rng.randint(0, min(max_constraints - 1, len(others))))]
        phrases, kwargs = zip(*(phrase(catalogue[k], rng) for k in ids))
        tasks.append({"key": f"{key_prefix}-{i:05d}", "prompt": " ".join([text.strip(), *phrases]),
                      "instruction_id_list": ids, "kwargs": list(kwargs), "task_type": text.split()[0].lower()})
    return tasks


def failed_constraints(task: dict, response: str) -> list[str]:
    """The instruction ids `response` fails (strict IFEval checks), in the task's order."""
    ids, kwargs = task.get("instruction_id_list") or [], task.get("kwargs") or []
    if len(ids) != len(kwargs):
        raise ValueError(f"task {task.get('key')!r}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    for iid, kw in zip(ids, kwargs):
        validate_instruction(iid, kw)
    return [iid for iid, kw in zip(ids, kwargs) if not check_instruction(iid, kw, task["prompt"], response)]
