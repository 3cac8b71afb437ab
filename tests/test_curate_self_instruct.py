"""Self-Instruct prompts, parsing and filters with a scripted generator: every candidate is counted under
the rule that rejected it, and the kept ones become Alpaca records the data pipeline reads back."""

from __future__ import annotations

import json

import pytest

from jaxtune.curate import self_instruct as si
from jaxtune.data.formats import load_records

# One completion of the open list "…8. <task>\n9." — each item trips one rule, or passes.
LIST_COMPLETION = (
    " write a haiku about autumn leaves falling.\n"
    "10. Describe the picture on your wall.\n"
    "11. Summarize the story of Hamlet in two sentences.\n"
    "12. ...and then some more words here\n"
    "13. Hi there\n"
    "14. Write a program that sorts a list of numbers.\n"
    "15. Write a haiku about the autumn leaves falling.\n"
    "16. Classify the sentiment of the movie review as positive or negative.\n"
    "17. Explain why the sky")

INSTANCES = {
    "Write a haiku about autumn leaves falling.":
        "Output: Leaves drift slowly down\nExample 2\nOutput: Leaves drift slowly down\n"
        "Example 3\nInput: same words\nOutput: Same words\nExample 4\nInput: x\n",
    "Summarize the story of Hamlet in two sentences.":
        "Output: A prince avenges his father.\nExample 2\nInput: Act 1\nOutput: A ghost appears.\n"
        "Example 3\nOutput: Everyone dies.\nExample 4\nOutput: Ophelia drowns.\n\nTask: Next task\nExample 1\n"
        "Output: not part of this task",
    "Classify the sentiment of the movie review as positive or negative.":
        " Positive\nInput: I loved this film.\nClass label: Negative\nInput: Boring and far too long.\n",
}


class ScriptedLM:
    """Answers by prompt kind; records every call so tests can look at the prompts."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, max_new_tokens, seed):
        self.calls.append((list(prompts), max_new_tokens, seed))
        out = []
        for p in prompts:
            if p.startswith(si.INSTRUCTION_HEADER):
                out.append(LIST_COMPLETION)
            elif p.startswith(si.CLASSIFY_HEADER):
                out.append(" Yes" if p.rsplit("Task: ", 1)[1].startswith("Classify") else " No")
            else:
                task = p.rsplit("Task: ", 1)[1].split("\n")[0]
                out.append(INSTANCES[task])
        return out


@pytest.fixture(scope="module")
def seeds(assets_dir):
    return si.load_seed_tasks(assets_dir / "data" / "self_instruct_seed_tasks.jsonl")


def test_load_seed_tasks(seeds, assets_dir):
    raw = [json.loads(line) for line in open(assets_dir / "data" / "self_instruct_seed_tasks.jsonl")]
    assert len(seeds) == len(raw)
    assert sum(s.is_classification for s in seeds) == sum(r["is_classification"] for r in raw)
    assert seeds[1].instances == ((raw[1]["instances"][0]["input"], raw[1]["instances"][0]["output"]),)


def test_load_seed_tasks_names_the_bad_record(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok", "instances": [{"input": "", "output": "x"}]}\n'
                   '{"instruction": "bad", "instances": [{"input": ""}]}\n')
    with pytest.raises(ValueError, match=r"seeds.jsonl:2: field 'instances'"):
        si.load_seed_tasks(bad)


def test_instruction_prompt_format():
    p = si.instruction_prompt(["Tell a joke:", "Name  a\nplanet."])
    assert p == "Come up with a series of tasks:\n\n1. Tell a joke\n2. Name a planet.\n3."


def test_parse_instructions():
    parsed = si.parse_instructions(" first task here\n2) second task\n3. third one\nwith a second line\n4. cut")
    assert parsed == [("First task here", True), ("Second task", True), ("Third one", True), ("Cut", False)]
    # a blank line ends the list; the item before it is complete
    assert si.parse_instructions(" only task\n\n5. ignored") == [("Only task", True)]


@pytest.mark.parametrize("inst, complete, check", [
    ("", True, "empty"),
    ("Write a long essay about", False, "unfinished"),
    ("Hi there", True, "too short"),
    (" ".join(["word"] * 151), True, "too long"),
    ("Draw a cat with a hat.", True, "blacklisted word"),
    ("Convert this graph into a table.", True, "blacklisted word"),
    ("Summarize the plot of Hamlet.", True, "blacklisted word"),  # the paper's list is blunt
    ("Write a program to add two numbers.", True, "asks for a program"),
    ("- List three colors please.", True, "starts with punctuation"),
    ("Éxplain the rules of chess.", True, "starts with non-ASCII"),
    ("Explain the rules of chess.", True, None),
    ("Name three mapmakers from history.", True, None),  # "map" only as a whole word
])
def test_check_instruction(inst, complete, check):
    failed = si.check_instruction(inst, complete, si.SelfInstructConfig())
    assert (failed[0] if failed else None) == check


def test_parse_instances():
    text = "Example 1\n" + INSTANCES["Summarize the story of Hamlet in two sentences."]
    assert si.parse_instances(text, False) == [
        ("", "A prince avenges his father."), ("Act 1", "A ghost appears."), ("", "Everyone dies."),
        ("", "Ophelia drowns.")]
    text = "Class label:" + INSTANCES["Classify the sentiment of the movie review as positive or negative."]
    assert si.parse_instances(text, True) == [("I loved this film.", "Positive"),
                                              ("Boring and far too long.", "Negative")]


def test_self_instruct_with_scripted_model(seeds, tmp_path):
    lm = ScriptedLM()
    cfg = si.SelfInstructConfig(num_instructions=10, prompts_per_round=2, patience=2, classify_shots=4)
    rows, (instr, inst) = si.self_instruct_dataset(lm, seeds, cfg)

    # Round 1 prompt 1 keeps three; every later copy of them is too similar; rounds 2 and 3 keep nothing.
    assert instr.notes["rounds"] == 3
    assert instr.records_in == 3 * 2 * 9 and instr.records_out == 3
    assert {k: v for k, v in instr.rejected.items() if v} == {
        "unfinished": 6, "too short": 6, "blacklisted word": 6, "asks for a program": 6,
        "starts with punctuation": 6, "too similar (ROUGE-L)": 1 + 5 * 4}

    first = lm.calls[0][0][0]
    assert first.startswith("Come up with a series of tasks:\n\n1. ") and first.endswith("\n9.")
    assert "Write a haiku about autumn leaves falling." not in first
    kept = ["Write a haiku about autumn leaves falling.", "Summarize the story of Hamlet in two sentences.",
            "Classify the sentiment of the movie review as positive or negative."]
    for p in lm.calls[1][0]:  # later prompts show prompt_machine=2 generated instructions among 8
        assert sum(k in p for k in kept) == 2 and p.endswith("\n9.")

    # Instances: haiku keeps 1 (duplicate, same input/output, no output rejected), Hamlet 3 of 4, labels 2.
    assert {k: v for k, v in inst.rejected.items() if v} == {
        "no output": 1, "same input and output": 1, "duplicate instance": 1, "over max_instances": 1}
    assert inst.notes["classification tasks"] == 1
    assert len(rows) == 6
    assert {"instruction": "Classify the sentiment of the movie review as positive or negative.",
            "input": "I loved this film.", "output": "Positive"} in rows
    assert all(r["output"] != "not part of this task" for r in rows)

    from jaxtune.curate.records import write_rows
    convs, _ = load_records(write_rows(rows, tmp_path / "si.jsonl"))
    assert len(convs) == 6 and convs[0].messages[-1]["content"] == rows[0]["output"]

    # Same seed, same prompts; another seed samples other seed tasks.
    again = ScriptedLM()
    si.self_instruct_dataset(again, seeds, cfg)
    assert again.calls == lm.calls
    other = ScriptedLM()
    si.self_instruct_dataset(other, seeds, si.SelfInstructConfig(num_instructions=10, prompts_per_round=2, patience=2,
                                                         classify_shots=4, seed=1))
    assert other.calls[0][0] != lm.calls[0][0]


def test_stops_when_nothing_new(seeds):
    calls = []

    def silent(prompts, max_new_tokens, seed):
        calls.append(len(prompts))
        return ["" for _ in prompts]

    rows, (instr, inst) = si.self_instruct_dataset(silent, seeds, si.SelfInstructConfig(num_instructions=5, patience=3))
    assert rows == [] and instr.notes["rounds"] == 3 and instr.rejected["empty"] == 3 * 8
    assert calls == [8, 8, 8]  # no classification or instance calls without instructions


def test_config_validation():
    with pytest.raises(ValueError, match="prompt_machine"):
        si.SelfInstructConfig(prompt_tasks=2, prompt_machine=2)
