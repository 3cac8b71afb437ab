"""The experiment's training-set arms: the foreign writer meets every constraint of the stories domain in a
register of its own, the noise model's proportions are exact, and the self/foreign mix is even."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import arms  # noqa: E402

from jaxtune.curate import stories  # noqa: E402
from jaxtune.curate.constraints import failed_constraints  # noqa: E402
from jaxtune.eval.ifeval_text import count_sentences, count_words  # noqa: E402

FORBIDDEN = stories.KINDS["keywords:forbidden_words"].values


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    """2400 tasks: both premise splits, up to two and three constraints, three seeds."""
    out = []
    for split in ("train", "eval"):
        premises = stories.load_premises(split=split)
        for max_constraints in (2, 3):
            for seed in (0, 1, 2):
                out += stories.compose_tasks(premises, 200, seed=seed, max_constraints=max_constraints,
                                             key_prefix=f"{split}-{max_constraints}-{seed}")
    return out


@pytest.fixture(scope="module")
def responses(tasks) -> list[str]:
    return [arms.foreign_response(t, 0) for t in tasks]


def test_foreign_passes_every_constraint(tasks, responses):
    assert len(tasks) >= 2000
    failing = [(t["prompt"], r, failed_constraints(t, r)) for t, r in zip(tasks, responses)
               if failed_constraints(t, r)]
    assert not failing, failing[:3]
    assert all(kind in {i for t in tasks for i in t["instruction_id_list"]} for kind in stories.KINDS)


def test_foreign_shape(tasks, responses):
    """4-7 sentences unless a limit forces fewer, 60-160 words, the premise's name and action in the story."""
    for t, r in zip(tasks, responses):
        limits = [kw["num_sentences"] - 1 for i, kw in zip(t["instruction_id_list"], t["kwargs"])
                  if i == "length_constraints:number_sentences"]
        assert min([4, *limits]) <= count_sentences(r) <= min([7, *limits]), r
        assert 55 <= count_words(r) <= 160, r
        premise = arms.premise_of(t)
        name = stories.Premise(premise, "", "").name
        assert name in r, r
        if " whose " in premise:
            action = premise.split(" whose ", 1)[1].split(" ", 1)[1]
        else:
            action = premise.split(" who ", 1)[1]
        if not any(w in action.split() for w in FORBIDDEN):
            assert action in r, (premise, r)


def test_foreign_avoids_trained_end_phrases_when_unasked(tasks, responses):
    unasked = [r for t, r in zip(tasks, responses) if "startend:end_checker" not in t["instruction_id_list"]]
    assert len(unasked) > 500
    for r in unasked:
        assert not any(r.strip().lower().endswith(e.lower()) for e in arms.END_PHRASES), r


def test_foreign_register_is_not_tinystories(responses):
    text = " ".join(responses).lower()
    assert "once upon a time" not in text
    words = re.findall(r"[a-z]+", text)
    assert sum(map(len, words)) / len(words) > 4.5
    sentences = sum(count_sentences(r) for r in responses[:300])
    assert sum(count_words(r) for r in responses[:300]) / sentences > 14


def test_foreign_deterministic_and_varied(tasks, responses):
    assert [arms.foreign_response(t, 0) for t in tasks[:50]] == responses[:50]
    other = [arms.foreign_response(t, 1) for t in tasks[:50]]
    assert sum(a != b for a, b in zip(other, responses[:50])) >= 48
    assert len(set(responses[:500])) >= 450


def test_foreign_banks_hold_no_forbidden_word():
    """No filler or template can produce a forbidden word; a keyword sentence holds only its own word."""
    pattern = re.compile(rf"\b({'|'.join(FORBIDDEN)})\b", re.IGNORECASE)
    banks = [*arms.OPENERS, *arms.GENERIC_ACTIONS, *arms.MIDDLES, *arms.OBJECT_MIDDLES, *arms.CLOSERS,
             *(t for ts in arms.END_CLOSERS.values() for t in ts), arms.GENERIC_KEYWORD,
             *(w for ws in arms.WORDS.values() for w in ws), *arms._SYNONYMS.values()]
    assert not [b for b in banks if pattern.search(b)]
    for word, templates in arms.KEYWORD_SENTENCES.items():
        for t in templates:
            assert word in t.lower()
            assert {m.lower() for m in pattern.findall(t)} <= {word}, t
    templates = [*arms.MIDDLES, *arms.OBJECT_MIDDLES, *arms.CLOSERS, *(t for ts in arms.END_CLOSERS.values()
                                                                      for t in ts)]
    templates += [t for ts in arms.KEYWORD_SENTENCES.values() for t in ts]
    assert len(templates) >= 40
    assert all(t.count("{S}") + t.count("{N}") == 1 for t in templates)


def test_foreign_required_and_forbidden_word_together():
    task = {"key": "k", "prompt": 'Write a short story about a girl named Lily who climbs a big tree. Use the word '
            '"big". Do not use the word "big".', "instruction_id_list": ["keywords:existence",
                                                                       "keywords:forbidden_words"],
            "kwargs": [{"keywords": ["big"]}, {"forbidden_words": ["big"]}]}
    for seed in range(20):
        r = arms.foreign_response(task, seed)
        assert failed_constraints(task, r) == [] and "bigger" in r and "enormous tree" in r


def test_foreign_rejects_other_prompts():
    with pytest.raises(ValueError, match="'x'.*does not start with"):
        arms.foreign_response({"key": "x", "prompt": "Tell me a joke.", "instruction_id_list": [], "kwargs": []}, 0)


# -- noise ------------------------------------------------------------------------------------------


def _samples(n_tasks: int = 120, per_task: int = 4) -> list[dict]:
    tasks = stories.compose_tasks(stories.load_premises(split="train"), n_tasks, seed=3, max_constraints=2)
    out = []
    for t in tasks:
        for j in range(per_task):
            words = [f"w{t['key'][-3:]}{j}x{k}" for k in range(10 + (j * 7) % 30)]
            out.append({"key": t["key"], "task": t, "sample": j, "response": " ".join(words) + ".",
                        "finish": "length" if j == 3 else "stop", "passed": False})
    return out


@pytest.mark.parametrize("n,shares", [(400, (0.10, 0.10, 0.10)), (333, (0.2, 0.05, 0.3)), (97, (0, 0, 0))])
def test_noisy_set_exact_proportions(n, shares):
    mis, trunc, dup = shares
    samples = _samples()
    records, comp = arms.noisy_set(samples, n, seed=7, mismatched=mis, truncated=trunc, duplicated=dup)
    counts = Counter(r["noise"] for r in records)
    assert len(records) == n and comp["counts"] == {k: counts[k] for k in arms.NOISE_LABELS}
    for label, share in (("mismatched", mis), ("truncated", trunc), ("duplicated", dup)):
        assert abs(counts[label] - n * share) <= 0.5, (label, counts)
    assert counts["raw"] == n - counts["mismatched"] - counts["truncated"] - counts["duplicated"]
    assert comp["proportions"] == {"mismatched": mis, "truncated": trunc, "duplicated": dup}
    originals = [r for r in records if r["noise"] != "duplicated"]
    assert len({(r["key"], r["sample"]) for r in originals}) == len(originals)
    by_id = {(s["key"], s["sample"]): s for s in samples}
    failing = sum(bool(failed_constraints(by_id[r["key"], r["sample"]]["task"], r["messages"][1]["content"]))
                  for r in records)
    assert comp["failing"] == failing == sum(comp["failing_by_noise"].values())
    source = {(r["key"], r["sample"]): by_id[tuple(r["donor"])] if r["noise"] == "mismatched" else
              by_id[r["key"], r["sample"]] for r in originals}
    unfinished = sum(r["noise"] == "truncated" or r.get("copy_of") == "truncated" or
                     source[r["key"], r["sample"]]["finish"] == "length" for r in records)
    assert comp["unfinished"] == unfinished


def test_noisy_set_deterministic():
    samples = _samples()
    a = arms.noisy_set(samples, 300, seed=1)
    assert a == arms.noisy_set(samples, 300, seed=1)
    assert a[0] != arms.noisy_set(samples, 300, seed=2)[0]


def test_noisy_set_too_small_pool():
    with pytest.raises(ValueError, match=r"need 450 distinct samples, but the pool holds 40$"):
        arms.noisy_set(_samples(10), 500, seed=0)


def test_noisy_set_noise_kinds():
    samples = _samples()
    by_id = {(s["key"], s["sample"]): s for s in samples}
    records, _ = arms.noisy_set(samples, 400, seed=5, mismatched=0.2, truncated=0.2, duplicated=0.2)
    for r in records:
        own = by_id[r["key"], r["sample"]]
        prompt, response = (m["content"] for m in r["messages"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and prompt == own["task"]["prompt"]
        if r["noise"] == "raw":
            assert response == own["response"]
        elif r["noise"] == "mismatched":
            donor = by_id[tuple(r["donor"])]
            assert response == donor["response"]
            assert arms.premise_of(donor["task"]) != arms.premise_of(own["task"])
        elif r["noise"] == "truncated":
            full = own["response"]
            assert full.startswith(response) and len(response) < len(full) and full[len(response)].isspace()
            kept, total = len(response.split()), len(full.split())
            assert 0.2 * total <= kept <= 0.8 * total
    originals = [r for r in records if r["noise"] != "duplicated"]
    for r in records:
        if r["noise"] == "duplicated":
            same = [o for o in originals if (o["key"], o["sample"]) == (r["key"], r["sample"])]
            assert len(same) == 1 and same[0]["messages"] == r["messages"] and same[0]["noise"] == r["copy_of"]


def test_noisy_set_mismatch_needs_two_premises():
    pool = _samples()
    samples = [s for s in pool if arms.premise_of(s["task"]) == arms.premise_of(pool[0]["task"])]
    with pytest.raises(ValueError, match="two premises"):
        arms.noisy_set(samples, len(samples), seed=0, mismatched=0.5, truncated=0.0, duplicated=0.0)


# -- mix --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 11, 1])
def test_mix_exactly_half(n):
    tasks = stories.compose_tasks(stories.load_premises(split="train"), n, seed=0)
    own = [arms.to_record(t, f"self {i}", "self") for i, t in enumerate(tasks)]
    foreign = [arms.to_record(t, arms.foreign_response(t, 0), "foreign") for t in tasks]
    mixed = arms.mix(own, foreign, seed=3)
    assert [r["key"] for r in mixed] == [t["key"] for t in tasks]
    sources = Counter(r["source"] for r in mixed)
    assert sources["self"] + sources["foreign"] == n and abs(sources["self"] - sources["foreign"]) <= 1
    for r, s, f in zip(mixed, own, foreign):
        assert r == (s if r["source"] == "self" else f)
    assert mixed == arms.mix(own, foreign, seed=3)


def test_mix_differs_by_seed_and_checks_keys():
    tasks = stories.compose_tasks(stories.load_premises(split="train"), 40, seed=0)
    own = [arms.to_record(t, "a", "self") for t in tasks]
    foreign = [arms.to_record(t, "b", "foreign") for t in tasks]
    assert arms.mix(own, foreign, seed=0) != arms.mix(own, foreign, seed=1)
    with pytest.raises(ValueError, match="differ at index 0"):
        arms.mix(own, foreign[::-1], seed=0)


def test_to_record_layout():
    task = {"key": "story-00001", "prompt": "Write a short story about a cat named Tom who wants to fly."}
    assert arms.to_record(task, "Tom flies.", "self") == {
        "messages": [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": "Tom flies."}],
        "key": "story-00001", "source": "self"}
