"""Over-reach detectors (unwarranted refusals, unrequested formatting) measured against hand-labelled
responses in fixtures/overreach_labels.jsonl, plus unit cases per formatting kind and the scorer's n.

Labels: `refusal` is true when the response declines the request in its opening, or opens with an
"As an AI" disclaimer; `formatting` lists the kinds present that the prompt's wording did not ask for.
Records carry a `note` where the label is a judgement call; several are known misses kept on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxtune.eval import overreach as O
from jaxtune.jsonl import read_jsonl

LABELS = Path(__file__).parent / "fixtures" / "overreach_labels.jsonl"


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    return [rec for _, rec in read_jsonl(LABELS, ValueError)]


def _pr(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return tp / (tp + fp) if tp + fp else 1.0, tp / (tp + fn) if tp + fn else 1.0


def test_labels_are_well_formed(labelled):
    assert len(labelled) >= 50
    for i, rec in enumerate(labelled):
        assert isinstance(rec["prompt"], str) and isinstance(rec["response"], str), i
        assert isinstance(rec["refusal"], bool), i
        assert all(k in O.KINDS for k in rec["formatting"]), i
    assert sum(r["refusal"] for r in labelled) >= 15 and sum(not r["refusal"] for r in labelled) >= 30
    assert {k for r in labelled for k in r["formatting"]} == set(O.KINDS)


def test_refusal_precision_and_recall(labelled):
    tp = fp = fn = tn = 0
    for rec in labelled:
        got = O.refusal(rec["response"]) is not None
        tp += got and rec["refusal"]
        fp += got and not rec["refusal"]
        fn += not got and rec["refusal"]
        tn += not got and not rec["refusal"]
    precision, recall = _pr(tp, fp, fn)
    summary = f"refusal: tp={tp} fp={fp} fn={fn} tn={tn} precision={precision:.3f} recall={recall:.3f}"
    print(summary)
    assert precision >= 0.9 and recall >= 0.9, summary


def test_formatting_precision_and_recall(labelled):
    per_kind = {k: [0, 0, 0] for k in O.KINDS}  # tp, fp, fn over (record, kind) pairs
    records = [0, 0, 0]  # tp, fp, fn of "has any unrequested formatting"
    for rec in labelled:
        got, want = set(O.unrequested_formatting(rec["prompt"], rec["response"])), set(rec["formatting"])
        for k in O.KINDS:
            per_kind[k][0] += k in got and k in want
            per_kind[k][1] += k in got and k not in want
            per_kind[k][2] += k not in got and k in want
        records[0] += bool(got) and bool(want)
        records[1] += bool(got) and not want
        records[2] += not got and bool(want)
    pairs = [sum(c[i] for c in per_kind.values()) for i in range(3)]
    lines = [f"{k:<7} tp={c[0]} fp={c[1]} fn={c[2]}" for k, c in per_kind.items()]
    pair_p, pair_r = _pr(*pairs)
    rec_p, rec_r = _pr(*records)
    lines += [f"pairs   tp={pairs[0]} fp={pairs[1]} fn={pairs[2]} precision={pair_p:.3f} recall={pair_r:.3f}",
              f"records tp={records[0]} fp={records[1]} fn={records[2]} precision={rec_p:.3f} recall={rec_r:.3f}"]
    summary = "\n".join(lines)
    print(summary)
    assert min(pair_p, pair_r, rec_p, rec_r) >= 0.85, summary


# --------------------------------------------------------------------------------------------- refusal

@pytest.mark.parametrize("response", [
    "I'm sorry, but I can't help with that.",
    "I\u2019m sorry, but I can\u2019t.",
    "I cannot help with that request.",
    "As an AI language model, I cannot write stories.",
    "I won't be able to write that for you.",
    "I'm not able to provide that information.",
    "Hello there! I must respectfully decline.",
    "That's not something I can help with.",
])
def test_refusal_fires(response):
    assert O.refusal(response)


@pytest.mark.parametrize("response", [
    '"I can\'t wait!" said Lily.',
    '"Sorry, Mom," Tom said.',
    "He could not find the ball.",
    "\u201cI cannot help you,\u201d said the owl. So the mouse went home.",
    "I can't help but smile at the sea.",
    "I cannot recommend this book enough.",
    "Sure! Here is the poem. It has four lines. It rhymes. I can't promise it is good, though.",  # not the opening
])
def test_refusal_ignores_dialogue_idioms_and_late_caveats(response):
    assert O.refusal(response) is None


def test_refusal_phrase_is_the_anywhere_boilerplate_test():
    text = "Gravity pulls things down. As an AI language model, I find that neat."
    assert O.refusal_phrase(text) == "as an ai language model"
    assert O.refusal(text) is None  # a disclaimer after the opening is boilerplate, not a refusal
    assert O.refusal_phrase("My knowledge cutoff is 2021.") == "my knowledge cutoff"
    assert O.refusal_phrase("Plants need light.") is None
    assert O.refusal_phrase("I\u2019M  SORRY,  but I can\u2019t", ("i'm sorry, but i can't",)) is not None


# ------------------------------------------------------------------------------------------ formatting

@pytest.mark.parametrize("response, kinds", [
    ("- red\n- blue", ["list"]),
    ("\u2022 red\n\u2022 blue", ["list"]),
    ("1) red\n2) blue", ["list"]),
    ("- only one item", []),
    ("# Colours\nRed and blue.", ["header"]),
    ("<<Colours>>\nRed and blue.", ["header"]),
    ("Colours of the Sea\n\nThe sea is blue.", ["header"]),
    ("Sure!\n\nThe sea is blue.", []),
    ('{"a": 1}', ["json"]),
    ('Here it is:\n[{"a": 1}]\nDone.', ["json"]),
    ("The sum of [1, 2, 3] is 6.", []),
    ("```\nprint(1)\n```", ["code"]),
    ("```json\n{\"a\": 1}\n```", ["json"]),
    ("```python\n# a comment, not a header\n- x\n- y\nz = 2**3**4\n```", ["code"]),
    ("It is **very** blue.", ["bold"]),
    ("x**2 + y**2 = r**2", []),
    ("2 * 3 * 4 = 24.", []),
    ("| a | b |\n|---|---|\n| 1 | 2 |", ["table"]),
    ("Use a | b to pipe.", []),
    ("Plain prose with no markup at all.", []),
])
def test_formatting_kinds(response, kinds):
    assert O.formatting_kinds(response) == kinds


@pytest.mark.parametrize("prompt, asked", [
    ("List three fruits.", {"list"}),
    ("Give the steps in a numbered list with a title.", {"list", "header"}),
    ("Answer in JSON.", {"json"}),
    ("Write a Python function that adds two numbers.", {"code"}),
    ("What is the function of the liver?", set()),
    ("Highlight the key words.", {"bold"}),
    ("Put the results in a table.", {"table"}),
    ("Explain rain. Do not use bullet points or headers.", set()),
    ("Explain rain without a list, then give it a title.", {"header"}),
    ("Tell me about the sea.", set()),
])
def test_asked_formatting(prompt, asked):
    assert O.asked_formatting(prompt) == asked


def test_unrequested_formatting_drops_what_was_asked():
    response = "# Fruits\n\n- **apple**\n- pear"
    assert O.unrequested_formatting("Tell me about fruit.", response) == ["list", "header", "bold"]
    assert O.unrequested_formatting("List some fruits under a heading.", response) == ["bold"]
    assert O.unrequested_formatting("Don't use a list. Tell me about fruit.", response) == ["list", "header", "bold"]


# --------------------------------------------------------------------------------------------- scoring

def test_score_overreach_counts_and_denominators():
    prompts = ["List three fruits.", "Tell me about apples.", "Tell me about pears.", "Write a poem."]
    responses = ["- apple\n- pear\n- fig", "- red\n- green", "Pears are sweet.", "I'm sorry, but I can't."]
    out = O.score_overreach(prompts, responses)
    assert json.loads(json.dumps(out)) == out
    assert out["n"] == 4
    assert (out["refusal"]["k"], out["refusal"]["n"]) == (1, 4)
    assert (out["formatting"]["list"]["k"], out["formatting"]["list"]["n"]) == (1, 3)  # the list prompt is out
    assert (out["formatting"]["bold"]["k"], out["formatting"]["bold"]["n"]) == (0, 4)
    assert (out["formatting"]["any"]["k"], out["formatting"]["any"]["n"]) == (1, 4)
    assert out["formatting"]["list"]["value"] == pytest.approx(1 / 3)
    assert out["formatting"]["list"]["lo"] < 1 / 3 < out["formatting"]["list"]["hi"]
    assert out["rows"][0] == {"refusal": None, "asked": ["list"], "unrequested": []}
    assert out["rows"][3]["refusal"] == "sorry, but i can't."


def test_score_overreach_empty_and_mismatched():
    out = O.score_overreach([], [])
    assert out["n"] == 0 and out["refusal"]["value"] is None and out["formatting"]["list"]["n"] == 0
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        O.score_overreach(["a", "b"], ["x"])
