"""N-gram decontamination: a record copied from an evaluation prompt is dropped and counted under that set,
a paraphrase is kept, short records compare as one gram, and reference files load by their prompt field."""

from __future__ import annotations

import json

import pytest

from jaxtune.curate.decontam import NgramIndex, decontaminate, load_references
from jaxtune.curate.report import CurateReport
from jaxtune.data.formats import Conversation

STEERING = ["Write a short story about a dragon who is afraid of the dark and learns to love the night.",
            "List three reasons why regular exercise improves mental health in older adults."]
REPORT = ["Explain the difference between a virus and a bacterium in language a ten year old understands.",
          "Write a haiku about autumn leaves falling."]  # 7 words


def conv(instruction: str, response: str = "Sure, here it is.", source: str = "t") -> Conversation:
    return Conversation([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
                        source)


def test_overlap_fraction_and_best_reference():
    index = NgramIndex(STEERING + REPORT, n=8)
    assert index.overlap(STEERING[1]) == (1.0, 1)
    assert index.overlap(STEERING[1].upper().replace(" ", "  ")) == (1.0, 1)  # case and spacing ignored
    # 8 of the 12 eight-grams of this text come from reference 0 (its first 15 words verbatim)
    text = " ".join(STEERING[0].split()[:15]) + " completely different ending here"
    frac, best = index.overlap(text)
    assert best == 0 and frac == pytest.approx(8 / 12)
    assert index.overlap("Tell me a story about a brave knight and a friendly dragon in a castle.") == (0.0, None)
    assert index.overlap("") == (0.0, None)


def test_record_shorter_than_n_is_one_gram():
    index = NgramIndex(REPORT, n=8)
    assert index.overlap("Write a haiku about autumn leaves falling!") == (1.0, 1)  # 7 words, the whole reference
    assert index.overlap("a virus and a bacterium") == (1.0, 0)  # a contiguous run of a longer reference
    assert index.overlap("Write a haiku about falling autumn leaves.") == (0.0, None)  # same words, other order
    assert index.overlap("autumn leaves falling") != index.overlap("leaves autumn falling")


def test_decontaminate_drops_copies_keeps_paraphrases_and_counts_per_set():
    data = [
        conv(STEERING[0], source="copied-steering"),
        conv("Please answer: " + REPORT[0], source="copied-report"),
        conv("Give the story of a dragon scared of darkness that comes to enjoy nighttime.", source="paraphrase"),
        conv("What is two plus two?", "Explain the difference between a virus and a bacterium in language a ten "
             "year old understands.", source="in-response"),
        conv("Write a haiku about autumn leaves falling.", source="short"),
        conv("Name a planet.", "Mars", source="clean"),
    ]
    report = CurateReport("filter", records_in=len(data))
    kept = decontaminate(data, {"steering": STEERING, "report": REPORT}, report)
    assert [c.source for c in kept] == ["paraphrase", "clean"]
    assert report.rejected == {"contaminated: overlaps steering split": 1, "contaminated: overlaps report split": 3}
    details = {r.source: r.detail for r in report.rejects}
    assert details["in-response"].startswith("response shares 100% of its 8-grams with report prompt 1")
    assert details["copied-report"].startswith("prompt shares 82% of its 8-grams")  # 9 of 11: two words added
    assert details["short"].startswith("prompt shares 100% of its 8-grams with report prompt 2")
    assert report.notes["overlap with report"] == {"records": 3, "max": 1.0}
    assert report.notes["overlap with steering"] == {"records": 1, "max": 1.0}
    assert "overlap with report: records 3, max 1.0" in report.summary()


def test_threshold_and_n():
    data = [conv(" ".join(STEERING[0].split()[:15]) + " completely different ending here")]  # overlap 8/12
    refs = {"steering": STEERING}
    assert decontaminate(data, refs, CurateReport("x"), threshold=0.5) == []
    assert decontaminate(data, refs, CurateReport("x"), threshold=0.7) == data
    assert decontaminate(data, refs, CurateReport("x"), n=16, threshold=0.5) == data  # no 16-gram shared
    with pytest.raises(ValueError, match="threshold"):
        decontaminate(data, refs, CurateReport("x"), threshold=0)


def test_load_references(tmp_path):
    (tmp_path / "ifeval.jsonl").write_text("".join(json.dumps({"key": i, "prompt": p}) + "\n"
                                                   for i, p in enumerate(STEERING)))
    (tmp_path / "heldout.json").write_text(json.dumps([{"instruction": p, "output": "x"} for p in REPORT]))
    refs = load_references([tmp_path / "ifeval.jsonl", tmp_path / "heldout.json"])
    assert refs == {"ifeval": STEERING, "heldout": REPORT}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no prompt or instruction"):
        load_references([tmp_path / "bad.jsonl"])
    with pytest.raises(ValueError, match="two reference files are named 'ifeval'"):
        load_references([tmp_path / "ifeval.jsonl", tmp_path / "ifeval.jsonl"])
