"""SDFT: the rewrite prompt, final-answer extraction, and the consistency checks that decide between the
model's rewrite and a fallback to the reference response."""

from __future__ import annotations

import json

import pytest

from jaxtune.curate import sdft
from jaxtune.curate.records import write_conversations
from jaxtune.data.formats import load_records

CFG = sdft.SdftConfig()
LONG_REF = ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
            "glucose and release oxygen.")


@pytest.mark.parametrize("text, answer", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("So the result is \\boxed{3/4}.", "3/4"),
    ("Adding them up, the answer is 1,250.", "1,250"),
    ("The Answer is: Paris.", "Paris"),
    ("No marked answer here, just 42.", None),
])
def test_final_answer(text, answer):
    assert sdft.final_answer(text) == answer


@pytest.mark.parametrize("rewrite, reference, check", [
    ("", LONG_REF, "empty rewrite"),
    ("Using the reference answer, photosynthesis makes glucose.", LONG_REF, "mentions the reference"),
    ("As an AI language model, I cannot explain photosynthesis.", LONG_REF, "refusal"),
    ("Green plants turn sunlight, water and carbon dioxide into glucose and give off oxygen; this is "
     "photosynthesis.", LONG_REF, None),
    ("Plants.", LONG_REF, "length ratio"),
    ("The stock market rose sharply today after the central bank announced lower interest rates for "
     "everyone.", LONG_REF, "low overlap (ROUGE-L)"),
    ("Tom has 5 apples and buys 3 more, so he has 8. The answer is 8.", "5 + 3 = 8\n#### 8", None),
    ("Tom ends with 1000.0 apples in total.", "Tom has 1,000 apples.\n#### 1,000", None),  # numbers as numbers
    ("5 + 4 = 9, so the answer is 9.", "5 + 3 = 8\n#### 8", "final answer differs"),
    ("I am not sure how many.", "5 + 3 = 8\n#### 8", "final answer differs"),
    ("The review is clearly positive.", "Positive", None),
    ("The review sounds negative to me.", "Positive", "label missing"),
])
def test_check_rewrite(rewrite, reference, check):
    failed = sdft.check_rewrite(rewrite, reference, CFG)
    assert (failed[0] if failed else None) == check


@pytest.fixture
def data(tmp_path):
    rows = [
        {"instruction": "What does photosynthesis do?", "input": "", "output": LONG_REF},
        {"instruction": "Classify the sentiment.", "input": "I loved it!", "output": "Positive"},
        {"instruction": "Add the numbers.", "input": "5 and 3", "output": "5 + 3 = 8\n#### 8"},
        {"instruction": "And photosynthesis?", "input": "", "output": LONG_REF, "history": [["Hi", "Hello!"]]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(path)[0]


REWRITES = {  # keyed by instruction: a good rewrite for the first two, bad ones for the rest
    "What does photosynthesis do?": " Photosynthesis lets green plants use sunlight, water and carbon dioxide "
                                    "to make glucose, releasing oxygen. ",
    "Classify the sentiment.": "The sentiment is positive.",
    "Add the numbers.": "5 + 3 = 9. The answer is 9.",
    "And photosynthesis?": "Your response should mention sunlight.",
}


def test_prompt_holds_instruction_input_and_reference(data):
    p = sdft.sdft_prompt(data[1])
    assert "### Instruction:\nClassify the sentiment.\n\n### Input:\nI loved it!\n\n" in p
    assert "### Reference answer:\nPositive\n\n### Response:\n" in p and p.startswith("Below is an instruction")
    assert "### Input:" not in sdft.sdft_prompt(data[0])


def test_distill_keeps_passing_rewrites_and_falls_back_otherwise(data, tmp_path):
    seen = []

    def fake(prompts, max_new_tokens, seed):
        seen.append((len(prompts), max_new_tokens, seed))
        return [REWRITES[p.split("### Instruction:\n")[1].split("\n")[0]] for p in prompts]

    out, report = sdft.distill(fake, data, sdft.SdftConfig(max_new_tokens=64, seed=3))
    assert seen == [(4, 64, 3)]
    assert [c.messages[-1]["content"] for c in out] == [
        REWRITES["What does photosynthesis do?"].strip(), "The sentiment is positive.",
        "5 + 3 = 8\n#### 8", LONG_REF]
    assert out[3].messages[:-1] == data[3].messages[:-1]  # history untouched
    assert report.notes == {"rewrites kept": 2, "fell back to the reference": 2}
    assert {k: v for k, v in report.rejected.items() if v} == {"final answer differs": 1,
                                                               "mentions the reference": 1}
    again, _ = load_records(write_conversations(out, tmp_path / "distilled.json"))
    assert [c.messages for c in again] == [c.messages for c in out]
    assert again[1].messages[0]["input"] == "I loved it!"


def test_distill_rejects_records_without_a_response():
    from jaxtune.data.formats import Conversation

    with pytest.raises(ValueError, match="story.txt:1: SDFT rewrites assistant responses"):
        sdft.distill(lambda p, n, s: [""] * len(p), [Conversation([], "story.txt:1", text="Once upon a time")])
