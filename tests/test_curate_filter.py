"""Quality checks on hand-written records (each must reject its bad case and keep the good ones), report
counts, exact dedup, and writing curated records back in layouts the data pipeline reads."""

from __future__ import annotations

import json
import math

import pytest

from jaxtune.curate import filter as F
from jaxtune.curate.records import to_rows, write_conversations
from jaxtune.curate.report import CurateReport
from jaxtune.curate.score import ResponseScore
from jaxtune.data.formats import Conversation, load_records


def conv(instruction: str, response: str, source: str = "t", inp: str = "") -> Conversation:
    user = {"role": "user", "content": instruction}
    if inp:
        user = {"role": "user", "content": f"{instruction}\n\n{inp}", "instruction": instruction, "input": inp}
    return Conversation([user, {"role": "assistant", "content": response}], source)


@pytest.mark.parametrize("response, rejected", [
    ("...", True), ("  \n ", True), ("N/A", False), ("Paris", False),
])
def test_empty_response(response, rejected):
    assert bool(F.check_empty(conv("Capital of France?", response))) is rejected


def test_response_and_prompt_length():
    c = conv("one two three four", "a b c d e")
    assert F.check_response_length(c, 1, 5) is None
    assert F.check_response_length(c, 6, 10) == "response 1 has 5 words, outside [6, 10]"
    assert F.check_response_length(c, 1, 4) == "response 1 has 5 words, outside [1, 4]"
    assert F.check_prompt_length(c, 4) is None and F.check_prompt_length(c, 3) == "prompt has 4 words, more than 3"


class _SplitTokenizer:
    def encode(self, text, add_special_tokens=True):
        return text.split()


def test_token_length_needs_tokenizer():
    c = conv("a b c", "d e f")
    assert F.check_tokens(c, _SplitTokenizer(), 6) is None
    assert F.check_tokens(c, _SplitTokenizer(), 5) == "6 tokens, more than 5"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        F.quality_checks(F.FilterConfig(max_tokens=10))


@pytest.mark.parametrize("instruction, response, inp, rejected", [
    ("Write a poem about the sea.", "A poem about the sea.", "", True),
    ("Write a poem about the sea.", "Write a poem about the sea", "", True),
    ("What is the capital of France?", "The capital of France is Paris.", "", False),
    ("Classify the review as positive or negative.", "Positive", "Great film!", False),
    # the input may be echoed (an already-correct sentence); only the instruction counts
    ("Correct the grammar of the sentence.", "She walks to school every day.", "She walks to school every day.",
     False),
])
def test_repeats_instruction(instruction, response, inp, rejected):
    assert bool(F.check_echo(conv(instruction, response, inp=inp), 0.9, 1)) is rejected


def test_repeats_instruction_pairs_each_turn_with_its_own_question():
    msgs = [{"role": "user", "content": "Write a poem about the sea."},
            {"role": "assistant", "content": "A poem about the sea."},
            {"role": "user", "content": "Now name a fish."}, {"role": "assistant", "content": "A cod."}]
    assert F.check_echo(Conversation(msgs, "t"), 0.9, 1).startswith("response 1 repeats the instruction")
    msgs[1]["content"] = "Waves roll in under a silver moon."
    msgs[3]["content"] = "Write a poem about the sea."  # echoes the first question, not its own
    assert F.check_echo(Conversation(msgs, "t"), 0.9, 1) is None


@pytest.mark.parametrize("response, rejected", [
    ("As an AI language model, I cannot have opinions.", True),
    ("I\u2019m sorry, but I cannot help with that.", True),
    ("My knowledge cutoff is 2021.", True),
    ("Language models such as GPT predict the next token.", False),
    ("OpenAI released GPT-4 in March 2023.", False),
    ("Sorry to hear that! Try restarting the router.", False),
])
def test_refusal(response, rejected):
    assert bool(F.check_refusal(conv("Q?", response), F.REFUSAL_PHRASES)) is rejected


@pytest.mark.parametrize("response, rejected", [
    ("\ufffd\ufffd\ufffd broken \ufffd text", True),
    ("###### ******* ------ ====== !!!!!!", True),
    ("ok\x00\x01\x02\x03 then", True),
    ("def f(x):\n    return x + 1  # add one", False),
    ("这是一个很好的回答。", False),
    ("I love it 😀", False),
    ("می\u200cخواهم به خانه بروم و کتاب می\u200cخوانم", False),  # Persian uses zero-width non-joiners
])
def test_garbage(response, rejected):
    assert bool(F.check_garbage(conv("Say something.", response), 0.5, 0.01)) is rejected


def test_language():
    german = conv("Beschreibe das Wetter heute.", "Heute ist es sonnig und warm, am Abend wird es regnen und kalt.")
    english = conv("Describe the weather today.", "Today it is sunny and warm, and in the evening it will rain.")
    assert F.check_language(german, "en") and "'de'" in F.check_language(german, "en")
    assert F.check_language(english, "en") is None
    assert F.check_language(conv("Hi", "Hallo"), "en") is None  # too short to tell: kept


def test_curate_counts_each_check_in_order():
    data = [
        conv("Name a planet.", "Mars", "ok1"),
        conv("Name a planet.", "...", "empty"),
        conv("Explain gravity.", "As an AI language model, I think gravity pulls.", "refusal"),
        conv("Write a poem about the sea.", "Write a poem about the sea.", "echo"),
        conv("Name a planet.", "  MARS ", "dup"),
        conv("Name a color.", "Blue", "ok2"),
    ]
    kept, report = F.curate(data, F.FilterConfig(dedup=("exact",)))
    assert [c.source for c in kept] == ["ok1", "ok2"]
    assert report.records_in == 6 and report.records_out == 2
    assert {k: v for k, v in report.rejected.items() if v} == {
        "empty response": 1, "repeats instruction": 1, "refusal/boilerplate": 1, "exact duplicate": 1}
    steps = report.steps()
    assert [s[0] for s in steps][:3] == ["empty response", "response length", "prompt length"]
    assert all(a[2] == b[1] for a, b in zip(steps, steps[1:]))  # out of one check = into the next
    assert steps[-1][2] == 2
    assert report.examples()["exact duplicate"][0].detail == "same text as ok1"
    summary = report.summary()
    assert "filter: 6 in, 2 out" in summary and "same text as ok1" in summary


def test_exact_dedup_normalises_case_and_space_not_punctuation():
    data = [conv("Hi", "Hello   World", "a"), conv("hi", "hello world", "b"), conv("Hi", "Hello, World", "c")]
    report = CurateReport("x", records_in=3)
    assert [c.source for c in F.dedup_exact(data, report)] == ["a", "c"]


def test_dedup_on_prompt_vs_all():
    data = [conv("Name a fruit.", "Apple", "a"), conv("Name a fruit.", "Banana", "b")]
    assert len(F.dedup_exact(data, CurateReport("x"), on="all")) == 2
    assert len(F.dedup_exact(data, CurateReport("x"), on="prompt")) == 1


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown dedup"):
        F.FilterConfig(dedup=("fuzzy",))
    with pytest.raises(ValueError, match="echo_threshold"):
        F.FilterConfig(echo_threshold=1.5)


def test_alpaca_round_trip(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5", "category": "math"},
            {"instruction": "And now?", "input": "", "output": "Still here.", "system": "Be brief.",
             "history": [["Hi", "Hello!"]]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs, _ = load_records(src)
    out = write_conversations(convs, tmp_path / "out.json")
    assert json.loads(out.read_text()) == rows
    again, _ = load_records(out)
    assert [c.messages for c in again] == [c.messages for c in convs]


def test_tool_conversations_are_written_as_messages(tmp_path):
    src = tmp_path / "tools.jsonl"
    rec = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."}]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    src.write_text(json.dumps(rec) + "\n" + json.dumps(plain) + "\n")
    convs, _ = load_records(src)
    rows = to_rows(convs)
    assert all("messages" in r for r in rows)  # one layout per file
    again, _ = load_records(write_conversations(convs, tmp_path / "out.jsonl"))
    assert [c.messages for c in again] == [c.messages for c in convs]


def test_text_and_chat_cannot_share_a_file():
    with pytest.raises(ValueError, match="plain-text records and conversations"):
        to_rows([Conversation([], "a", text="story"), conv("Q", "A")])


# --------------------------------------------------------------------------- scores, caps, decontamination

def typed(instruction: str, source: str, task_type: str | None = None) -> Conversation:
    c = conv(instruction, "An answer.", source)
    if task_type:
        c.meta["task_type"] = task_type
    return c


def test_cap_per_task_type_keeps_the_first_n_in_input_order():
    data = [typed("Q1", "a1", "qa"), typed("Q2", "b1", "brainstorm"), typed("Q3", "a2", "qa"),
            typed("Q4", "a3", "qa"), typed("Q5", "n1"), typed("Q6", "b2", "brainstorm"), typed("Q7", "a4", "qa")]
    data[4].meta["category"] = "qa"  # no task_type: its category stands in
    report = CurateReport("x", records_in=len(data))
    kept = F.cap_per_type(data, report, 2)
    assert [c.source for c in kept] == ["a1", "b1", "a2", "b2"]
    assert report.rejected == {"over cap for task type 'qa'": 3}
    assert report.notes["kept per task type"] == {"qa": 2, "brainstorm": 2}
    untyped = [typed("Q", f"u{i}") for i in range(3)]
    report = CurateReport("x", records_in=3)
    assert F.cap_per_type(untyped, report, 1) == untyped  # nothing to balance on: kept, and said so
    assert report.notes["no task type (not capped)"] == 3


def test_cap_by_verb():
    data = [typed("Write a poem.", "w1"), typed("write, then read.", "w2"), typed("List three fruits.", "l1"),
            typed("WRITE a song.", "w3"), typed("Explain rain.", "e1")]
    report = CurateReport("x", records_in=len(data))
    kept = F.cap_per_type(data, report, 2, by="verb")
    assert [c.source for c in kept] == ["w1", "w2", "l1", "e1"]
    assert report.rejected == {"over cap for verb 'write'": 1}
    assert report.notes["kept per verb"] == {"write": 2, "list": 1, "explain": 1}


def _score(ifd: float, ppl: float = 5.0) -> ResponseScore:
    return ResponseScore(ce_cond=math.log(ppl), ce_uncond=math.log(ppl) / ifd, ppl=ppl, ifd=ifd, n_tokens=4)


def test_score_filter_drops_ifd_and_perplexity_and_reports_distributions():
    data = [conv(f"Q{i}", "A", f"r{i}") for i in range(5)]
    scores = [_score(0.5), _score(1.0), _score(1.3), _score(0.9, ppl=80.0), _score(0.99)]
    report = CurateReport("x", records_in=5)
    kept = F.score_filter(list(zip(data, scores)), report, max_ifd=1.0, max_ppl=50.0)
    assert [c.source for c in kept] == ["r0", "r4"]
    assert report.rejected == {"IFD >= 1": 2, "perplexity > 50": 1}  # IFD exactly 1 is dropped
    assert report.rejects[0].detail.startswith("IFD 1.000 (CE")
    assert report.notes["IFD"] == {"n": 5, "mean": 0.938, "median": 0.99, "p10": 0.66, "p90": 1.18}
    assert report.notes["perplexity"]["n"] == 5
    report = CurateReport("x", records_in=5)
    assert F.score_filter(list(zip(data, scores)), report) == data  # no thresholds: only reported
    assert report.rejected == {} and report.notes["IFD"]["n"] == 5


def test_curate_scores_with_the_model_and_counts_what_it_cannot_score(monkeypatch):
    import jaxtune.curate.score as score_mod

    data = [conv("Name a planet.", "Mars", "good"), conv("Name a color.", "Blue", "noisy"),
            conv("Name a fruit.", "Apple", "long")]
    seen = {}

    def fake_scores(model, tokenizer, convs, *, template, end_token, seq_len, batch_size, report):
        seen.update(model=model, tokenizer=tokenizer, template=template, end_token=end_token, seq_len=seq_len,
                    n=len(convs))
        if report is not None:
            report.reject("not scored (longer than seq_len)", convs[2].source, "too long", convs[2])
        return [_score(0.6), _score(1.2), None]

    monkeypatch.setattr(score_mod, "response_scores", fake_scores)
    cfg = F.FilterConfig(max_ifd=1.0, score_template="chatml", score_end_token="<s>", score_seq_len=64)
    kept, report = F.curate(data, cfg, model="M", model_tokenizer="T")
    assert [c.source for c in kept] == ["good"]
    assert seen == {"model": "M", "tokenizer": "T", "template": "chatml", "end_token": "<s>", "seq_len": 64, "n": 3}
    assert {k: v for k, v in report.rejected.items() if v} == {"not scored (longer than seq_len)": 1,
                                                               "IFD >= 1": 1}
    assert report.records_out == 1 and report.notes["IFD"]["n"] == 2
    kept, report = F.curate(data, F.FilterConfig(), model="M", model_tokenizer="T")  # scores only reported
    assert len(kept) == 3 and report.notes["not scored (kept)"] == 1 and "IFD" in report.summary()
    with pytest.raises(ValueError, match="need a scoring model"):
        F.curate(data, F.FilterConfig(max_ifd=1.0))


def test_curate_decontaminates_and_caps():
    data = [typed("Write a haiku about autumn leaves falling.", "copied", "poem"),
            typed("Write a haiku about spring.", "p1", "poem"), typed("Write a limerick.", "p2", "poem"),
            typed("Name a planet.", "q1", "qa")]
    cfg = F.FilterConfig(dedup=(), cap_per_type=1)
    kept, report = F.curate(data, cfg, references={"report": ["Write a haiku about autumn leaves falling."]})
    assert [c.source for c in kept] == ["p1", "q1"]
    names = [s[0] for s in report.steps()]
    assert names.index("contaminated: overlaps report split") < names.index("over cap for task type 'poem'")
    assert report.records_out == 2


@pytest.mark.parametrize("field, value", [("max_ifd", 0), ("max_ppl", -1.0), ("cap_per_type", 0),
                                          ("cap_by", "topic"), ("decontam_threshold", 0), ("decontam_n", 0)])
def test_new_config_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        F.FilterConfig(**{field: value})


def test_task_type_round_trips(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"instruction": "Add.", "input": "", "output": "5", "category": "math", "task_type": "arithmetic"}]
    src.write_text(json.dumps(rows[0]) + "\n")
    convs, _ = load_records(src)
    assert convs[0].meta == {"category": "math", "task_type": "arithmetic"}
    assert json.loads(write_conversations(convs, tmp_path / "out.json").read_text()) == rows
