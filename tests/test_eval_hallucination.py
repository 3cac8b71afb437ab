"""Hallucination evals: grounded answers checked against their story, closed-book answers, abstentions and
guesses, their rates with n and Wilson intervals, the loaders' one-line errors, the shipped data, the CLI."""

import json

import pytest

from jaxtune import stats
from jaxtune.cli.main import main
from jaxtune.eval.closedbook import abstention, closedbook_prompt, load_closedbook, score_closedbook
from jaxtune.eval.grounded import grounded_prompt, load_grounded, score_grounded
from jaxtune.eval.hallucination import HallucinationDataError, answer_of, compare, contains_phrase, words

STORY = ("Once upon a time, a little girl named Lily had a red ball. She took the ball to the park. "
         "Her dog Spot ran after it. At the end, Lily and Spot went home happy.")


def rec(id="r1", question="What was the name of the little girl?", answer="Lily", aliases=(), kind="name",
        context=STORY):
    return {"id": id, "context": context, "question": question, "answer": answer, "aliases": list(aliases),
            "kind": kind}


def grounded_row(response, **kw):
    return score_grounded([rec(**kw)], [response])["rows"][0]


# ------------------------------------------------------------------------------------------------ grounded


def test_prompt_is_story_blank_line_question_answer():
    assert grounded_prompt(rec()) == STORY + "\n\nQuestion: What was the name of the little girl?\nAnswer:"
    assert closedbook_prompt({"question": " Why? "}) == "Question: Why?\nAnswer:"


def test_answer_copied_from_the_story_is_faithful_and_correct():
    row = grounded_row("Her name was Lily.")
    assert (row["faithful"], row["correct"], row["hallucinated"], row["empty"]) == (True, True, False, False)
    assert row["unsupported"] == [] and row["matched"] == "Lily"


def test_invented_name_is_hallucinated_and_named():
    row = grounded_row("The girl was called Rosie and her cat was Tibbles.")
    assert row["hallucinated"] and not row["faithful"] and not row["correct"]
    assert row["unsupported"] == ["rosie", "cat", "tibbles"]


def test_supported_but_wrong_answer_is_faithful_not_correct():
    row = grounded_row("Spot.")
    assert row["faithful"] and not row["correct"] and not row["hallucinated"]


def test_aliases_count_as_correct():
    kw = {"question": "Where did Lily take the ball?", "answer": "to the park", "aliases": ["park"], "kind": "place"}
    assert grounded_row("The park.", **kw)["correct"]
    assert grounded_row("She went to the park", **kw)["matched"] == "to the park"
    assert not grounded_row("Home.", **kw)["correct"]


def test_normalisation_case_punctuation_plural_possessive_numbers():
    assert grounded_row("LILY!!!")["correct"]
    assert grounded_row("  lily,  ")["faithful"]
    assert grounded_row("Lily\u2019s balls.")["faithful"]          # possessive and plural of "ball"
    assert grounded_row("The dogs ran.")["faithful"]                # plural of "dog"
    assert grounded_row("The cats ran.")["unsupported"] == ["cats"]
    assert words("Tom's DOGS don't run 4 miles") == ["tom", "dogs", "dont", "run", "four", "miles"]
    assert words("x\u00b2 of 07 and 21 and " + "9" * 5000)[:5] == ["x\u00b2", "of", "seven", "and", "21"]
    assert contains_phrase("She saw TWO boxes!", "2 box") and contains_phrase("ponies", "a pony")
    assert not contains_phrase("the park gate", "gate park")


def test_words_echoed_from_the_question_are_not_invented():
    context = "Lily walked to the park."
    assert grounded_row("She did visit the park.", context=context, question="Which place did Lily visit?",
                        answer="the park")["faithful"]
    assert grounded_row("She did visit the park.", context=context, question="Where did Lily go?",
                        answer="the park")["unsupported"] == ["visit"]


def test_only_the_first_sentence_or_line_is_the_answer():
    assert answer_of("  Lily. Then a dragon came.") == "Lily."
    assert answer_of("Lily\nA dragon named Zorg came.") == "Lily"
    assert answer_of('"Lily!" Then Zorg came.') == '"Lily!'
    assert grounded_row("Lily. Then a dragon named Zorg came.")["faithful"]


def test_empty_answer_is_neither_faithful_nor_hallucinated():
    for response in ("", "   ", "...", "\n\nLily"):
        row = grounded_row(response)
        assert row["empty"] == (response.strip() != "Lily")
        assert row["faithful"] == (not row["empty"]) and not row["hallucinated"]


def test_rates_carry_n_and_wilson_intervals_per_kind():
    records = [rec(id="a"), rec(id="b"), rec(id="c", kind="place", question="Where?", answer="the park"),
               rec(id="d", kind="place", question="Where?", answer="the park")]
    res = score_grounded(records, ["Lily.", "Rosie.", "The park.", "The moon."])
    assert res["n"] == 4 and [r["id"] for r in res["rows"]] == ["a", "b", "c", "d"]
    assert res["rates"]["hallucination"] == stats.rate(2, 4).to_dict()
    assert res["rates"]["correct"] == stats.rate(2, 4).to_dict()
    assert res["rates"]["faithful"]["k"] == 2 and res["rates"]["empty"]["k"] == 0
    assert set(res["by_kind"]) == {"name", "place"}
    assert res["by_kind"]["place"]["hallucination"] == stats.rate(1, 2).to_dict()


def test_responses_by_id_or_in_order():
    records = [rec(id="a"), rec(id="b")]
    by_id = score_grounded(records, {"b": "Rosie", "a": "Lily"})
    assert [r["response"] for r in by_id["rows"]] == ["Lily", "Rosie"]
    with pytest.raises(HallucinationDataError, match="1 responses for 2 records"):
        score_grounded(records, ["Lily"])
    with pytest.raises(HallucinationDataError, match=r"no response for records \['b'\]"):
        score_grounded(records, {"a": "Lily"})


def test_paired_comparison_of_base_and_tuned():
    from jaxtune.eval.grounded import METRICS

    records = [rec(id=str(i)) for i in range(4)]
    base = score_grounded(records, ["Rosie", "Rosie", "Lily", "Rosie"])["rows"]
    tuned = score_grounded(records, ["Lily", "Lily", "Lily", "Rosie"])["rows"]
    cmp = compare(base, tuned, METRICS)
    assert cmp["hallucination"]["base"]["k"] == 3 and cmp["hallucination"]["tuned"]["k"] == 1
    assert cmp["hallucination"]["difference"]["value"] == pytest.approx(-0.5)
    assert cmp["correct"]["difference"]["value"] == pytest.approx(0.5)
    assert cmp["correct"]["difference"]["n"] == 4
    with pytest.raises(ValueError, match="different records"):
        compare(base, tuned[::-1], METRICS)


# ---------------------------------------------------------------------------------------------- closed book

CLOSED = [{"id": "sky", "question": "What color is the sky on a sunny day?", "answers": ["blue"]},
          {"id": "legs", "question": "How many legs does a dog have?", "answers": ["four", "4"]},
          {"id": "dog", "question": "What is the name of the little girl's dog?", "answers": []}]


def closed_rows(sky, legs, dog):
    return score_closedbook(CLOSED, [sky, legs, dog])


@pytest.mark.parametrize("text", [
    "I don't know.", "I do not know what color it is.", "Hmm. I'm not sure.", "Not sure, maybe blue.",
    "No one knows.", "We cannot know that.", "There is no way to know.", "Unknown.", "That is unknown.",
    "I can't say.", "I have no idea!", "I don\u2019t know", "The story does not say.", "Nobody knows her name.",
])
def test_abstention_phrases(text):
    assert abstention(text)


@pytest.mark.parametrize("text", [
    'Lily said, "I don\'t know." Then she ate an apple.', "\u201cI don't know,\u201d said Tom. The sky is blue.",
    "Lily was not sure what to do.", "I can't tell you how happy I am.", "They walked into the unknown forest.",
    "The sky is blue.", "",
])
def test_not_abstentions(text):
    assert abstention(text) is None


def test_abstaining_on_unanswerable_is_good_guessing_is_hallucination():
    good = closed_rows("Blue.", "A dog has 4 legs.", "I don't know.")
    assert [r["outcome"] for r in good["rows"]] == ["correct", "correct", "abstained"]
    assert good["rates"]["hallucination"]["k"] == 0
    assert good["rates"]["abstained_unanswerable"] == stats.rate(1, 1).to_dict()
    guess = closed_rows("Blue.", "Four.", "Her dog is called Spot.")
    assert guess["rows"][2]["outcome"] == "answered" and guess["rows"][2]["hallucinated"]
    assert guess["rates"]["answered_unanswerable"]["k"] == 1 and guess["rates"]["hallucination"]["k"] == 1


def test_abstaining_on_answerable_is_not_wrong_and_not_correct():
    res = closed_rows("I don't know.", "Three.", "I'm not sure.")
    sky, legs, _ = res["rows"]
    assert sky["abstained"] and not sky["correct"] and not sky["wrong"] and not sky["hallucinated"]
    assert legs["wrong"] and legs["hallucinated"]
    r = res["rates"]
    assert (r["accuracy"]["k"], r["accuracy"]["n"]) == (0, 2)
    assert (r["wrong"]["k"], r["wrong"]["n"]) == (1, 2)
    assert (r["abstained_answerable"]["k"], r["abstained_answerable"]["n"]) == (1, 2)
    assert (r["abstained_unanswerable"]["k"], r["abstained_unanswerable"]["n"]) == (1, 1)
    assert r["hallucination"] == stats.rate(1, 3).to_dict()
    assert (res["answerable"], res["unanswerable"]) == (2, 1)


def test_quoted_i_dont_know_in_a_story_is_an_answer():
    res = closed_rows('"I don\'t know," said Tom. Then he ate a cake.', "Four.", 'Lily said, "I don\'t know."')
    assert [r["abstained"] for r in res["rows"]] == [False, False, False]
    assert res["rows"][0]["wrong"] and res["rows"][2]["outcome"] == "answered"


def test_empty_response_claims_nothing():
    row = closed_rows("", "Four.", "...")["rows"]
    assert row[0]["outcome"] == "empty" and not row[0]["wrong"] and not row[0]["hallucinated"]
    assert row[2]["outcome"] == "empty" and not row[2]["hallucinated"]


# ------------------------------------------------------------------------------------------------- loaders


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"context": " "}, r":2: field 'context' must be a non-empty string"),
    ({"question": None}, r":2: field 'question' must be a non-empty string"),
    ({"answer": "the"}, r":2: field 'answer' \('the'\) has no words"),
    ({"aliases": "park"}, r":2: field 'aliases' must be a list"),
    ({"aliases": ["park", 3]}, r":2: field 'aliases' item 1 must be a string"),
    ({"kind": ""}, r":2: field 'kind' must be a non-empty string"),
    ({"id": "r1"}, r":2: duplicate id 'r1'"),
])
def test_grounded_loader_errors_name_file_line_and_field(tmp_path, bad, message):
    good = rec()
    path = write(tmp_path, [good, {**rec(id="r2"), **bad}])
    with pytest.raises(HallucinationDataError, match=message) as e:
        load_grounded(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    first = {k: v for k, v in rec().items() if k != "context"}
    with pytest.raises(HallucinationDataError, match=r":1: field 'context'"):
        load_grounded(write(tmp_path, [first]))
    with pytest.raises(HallucinationDataError, match=r":1: not valid JSON"):
        load_grounded(write(tmp_path, ["{oops"]))


def test_grounded_loader_defaults(tmp_path):
    row = {k: v for k, v in rec().items() if k not in ("aliases", "kind")}
    (loaded,) = load_grounded(write(tmp_path, [{**row, "source": "mine"}]))
    assert loaded["aliases"] == [] and loaded["kind"] == "other"
    with pytest.raises(HallucinationDataError, match="no records"):
        load_grounded(write(tmp_path, []))


@pytest.mark.parametrize("bad, message", [
    ({"answer": "blue"}, r":1: field 'answers' \(not 'answer'\) is missing"),
    ({}, r":1: field 'answers' is missing"),
    ({"answers": "blue"}, r":1: field 'answers' must be a list of strings or null"),
    ({"answers": ["blue", ""]}, r":1: field 'answers' item 1 must be a non-empty string"),
    ({"answers": ["?"]}, r":1: field 'answers\[0\]' \('\?'\) has no words"),
])
def test_closedbook_loader_errors_name_file_line_and_field(tmp_path, bad, message):
    path = write(tmp_path, [{"id": "q", "question": "What color is the sky?", **bad}])
    with pytest.raises(HallucinationDataError, match=message) as e:
        load_closedbook(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_closedbook_null_and_empty_answers_are_unanswerable(tmp_path):
    path = write(tmp_path, [{"id": "a", "question": "Q?", "answers": None}, {"id": "b", "question": "Q?",
                                                                             "answers": []}])
    assert [r["answers"] for r in load_closedbook(path)] == [[], []]


# ------------------------------------------------------------------------------------------- shipped data


def grounded_problems(records) -> list[str]:
    """Records whose gold answer is not in its story, or whose gold answer or an alias, given as the response,
    would not score faithful and correct."""
    bad = [f"{r['id']}: answer not in context" for r in records if not contains_phrase(r["context"], r["answer"])]
    for r in records:
        for gold in (r["answer"], *r["aliases"]):
            row = score_grounded([r], [gold])["rows"][0]
            if not (row["faithful"] and row["correct"]):
                bad.append(f"{r['id']}: {gold!r} unsupported {row['unsupported']}")
    return bad


def test_shipped_grounded_stories():
    records = load_grounded()
    stories = {r["context"] for r in records}
    assert 35 <= len(stories) <= 45 and len(stories) <= len(records) <= 2 * len(stories)
    assert {"name", "object", "place", "ending"} <= {r["kind"] for r in records}
    assert grounded_problems(records) == []
    broken = dict(records[0], answer="a purple dragon")
    assert grounded_problems([broken]) == [f"{broken['id']}: answer not in context",
                                           f"{broken['id']}: 'a purple dragon' unsupported ['purple', 'dragon']"]


def test_shipped_closedbook_questions():
    records = load_closedbook()
    answerable = [r for r in records if r["answers"]]
    assert 20 <= len(answerable) <= 30 and 12 <= len(records) - len(answerable) <= 20
    # A gold answer echoed by the question would score any response that repeats the question as correct.
    assert [r["id"] for r in answerable if any(contains_phrase(r["question"], a) for a in r["answers"])] == []
    assert not all(r["answers"] for r in records[:6])   # `--limit 6` sees both sorts


def test_shipped_records_say_where_they_come_from():
    from jaxtune.eval import closedbook, grounded

    for path in (grounded.DEFAULT_DATA, closedbook.DEFAULT_DATA):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(r["source"] == "written for jaxtune (CC0)" for r in rows), path


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_rejects_bad_input_in_one_line(tmp_path, capsys):
    assert main(["eval", "grounded", "--model", "nowhere", "--limit", "0"]) == 2
    assert "--limit 0: must be at least 1" in capsys.readouterr().err
    bad = write(tmp_path, [{"id": "q", "question": "Q?"}])
    assert main(["eval", "closedbook", "--model", "nowhere", "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:1: field 'answers' is missing") and "\n" not in err


def test_cli_on_stories260k(stories_dir, tmp_path, capsys):
    out = tmp_path / "g"
    args = ["--model", str(stories_dir), "--limit", "6", "--max-new-tokens", "24", "--stop-id", "1"]
    assert main(["eval", "grounded", *args, "--base", str(stories_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hallucination" in printed and "pts" in printed and "by kind" in printed
    doc = json.loads((out / "grounded.json").read_text())
    assert list(doc["sides"]) == ["base", "tuned"] and doc["n"] == 6
    assert [len(s["rows"]) for s in doc["sides"].values()] == [6, 6]
    assert doc["sides"]["base"]["rows"] == doc["sides"]["tuned"]["rows"]      # same model, greedy
    assert doc["comparison"]["hallucination"]["difference"]["value"] == 0.0
    assert doc["sides"]["tuned"]["rates"]["hallucination"]["n"] == 6

    assert main(["eval", "closedbook", *args, "--out", str(tmp_path / "c")]) == 0
    doc = json.loads((tmp_path / "c" / "closedbook.json").read_text())
    assert list(doc["sides"]) == ["model"] and "comparison" not in doc
    rates = doc["sides"]["model"]["rates"]
    assert rates["accuracy"]["n"] + rates["abstained_unanswerable"]["n"] == 6 == rates["hallucination"]["n"]
    assert doc["settings"]["max_new_tokens"] == 24 and doc["models"]["model"] == str(stories_dir)
