"""IFEval checkers, tokenisation, scoring, response matching, CLI, and the official GPT-4 reference figures."""

import argparse
import json

import pytest

from jaxtune.cli.eval import register
from jaxtune.eval import ifeval, ifeval_text
from jaxtune.eval.ifeval import (
    IFEvalDataError,
    load_ifeval_inputs,
    load_responses,
    match_responses,
    score_responses,
)
from jaxtune.eval.ifeval_checks import (
    CHECKERS,
    check_instruction,
    check_instruction_loose,
    group_of,
    loose_variants,
)

EN = "The water cycle starts when the sun warms the sea and the vapour rises towards the clouds."
FR = "Le cycle de l'eau commence quand le soleil chauffe la mer et que la vapeur monte vers les nuages."

# (instruction id, kwargs, response, expected): every checker has at least one positive and one negative.
CASES = [
    ("keywords:existence", {"keywords": ["apple", "banana"]}, "I like Apple pie and banana bread.", True),
    ("keywords:existence", {"keywords": ["apple", "banana"]}, "I like apple pie.", False),
    ("keywords:existence", {"keywords": ["c++"]}, "I write C++ daily.", True),
    ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"}, "Data, data, more DATA.", True),
    ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"}, "data and data", False),
    ("keywords:frequency", {"keyword": "very", "frequency": 2, "relation": "less than"}, "It is very good.", True),
    ("keywords:frequency", {"keyword": "very", "frequency": 2, "relation": "less than"}, "very very good", False),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A badge is fine.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "That was Bad.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zebra zone", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zebra", False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "less than"}, "#one", True),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "less than"}, "#a #b", False),
    ("language:response_language", {"language": "fr"}, FR, True),
    ("language:response_language", {"language": "fr"}, EN, False),
    # langdetect finds no language in digits and punctuation; IFEval counts that as followed.
    ("language:response_language", {"language": "fr"}, "12345 !!!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two! Three?", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "Dr. Li came. Bye.", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Use e.g. a pen.", True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Hi. Bye.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst.\n***\nSecond.\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n\n***\nSecond.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one paragraph.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Just four words here.", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two-three four five", False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "it's fine", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "fine, ok", False),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
        'Intro text.\n\n"However, it works."',
        True,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro text.\n\nBut it does not.",
        False,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro.\n\nHowever it works.\n\nA third one.",
        False,
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks.\nP.S. See you soon.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Thanks. PS see you soon.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\n\nP.P.S. One more thing.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.S. One more thing.", False),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Body.\nnote: bring snacks", True),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Body only.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Intro\n* a\n  * b\n- c", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n**bold** is no bullet", False),
    ("detectable_format:constrained_response", {}, "After thinking: My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "Yes.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** ** and *\nx*", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section one\nfoo\nSection two\nbar", False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, '  ```\n"just a string"\n```  ', True),
    ("detectable_format:json_format", {}, 'Here it is: {"a": 1}', False),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", True),
    ("detectable_format:title", {}, "<< >>\nRoses are red.", False),
    ("detectable_format:title", {}, "<<broken\ntitle>> roses", False),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer B", True),
    ("combination:two_responses", {}, "Same\n******\nSame", False),
    ("combination:two_responses", {}, "A\n******\n******\nB", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "  write a poem. Roses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"\n', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '  "Hello world"\n', True),
    ("startend:quotation", {}, '"Hello world', False),
    ("startend:quotation", {}, '"', False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "I DON'T", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "Only NASA and AI-DRIVEN here.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "Hi NASA.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "CANNOT", False),
    ("change_case:english_capital", {}, EN.upper(), True),
    ("change_case:english_capital", {}, EN, False),
    ("change_case:english_capital", {}, FR.upper(), False),
    ("change_case:english_lowercase", {}, EN.lower(), True),
    ("change_case:english_lowercase", {}, EN, False),
    ("change_case:english_lowercase", {}, FR.lower(), False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "Yes, one.", False),
]


@pytest.mark.parametrize("instruction_id,kwargs,response,expected", CASES)
def test_checker(instruction_id, kwargs, response, expected):
    assert check_instruction(instruction_id, kwargs, "prompt", response) is expected



def test_every_checker_has_positive_and_negative_cases():
    outcomes = {}
    for instruction_id, _, _, expected in CASES:
        outcomes.setdefault(instruction_id, set()).add(expected)
    assert set(outcomes) == set(CHECKERS)
    assert all(v == {True, False} for v in outcomes.values())


@pytest.mark.parametrize("instruction_id", sorted(CHECKERS))
def test_empty_response_never_follows(instruction_id):
    kwargs = next(kw for i, kw, _, _ in CASES if i == instruction_id)
    assert check_instruction(instruction_id, kwargs, "prompt", " \n ") is False


def test_invalid_instructions_are_reported():
    with pytest.raises(ValueError, match="unknown instruction id 'nope:x'"):
        check_instruction("nope:x", {}, "p", "r")
    with pytest.raises(ValueError, match=r"needs kwargs \['num_words'\]"):
        check_instruction("length_constraints:number_words", {"relation": "at least"}, "p", "r")
    with pytest.raises(ValueError, match="relation must be one of"):
        check_instruction("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "p", "r")
    with pytest.raises(ValueError, match="single character"):
        kwargs = {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}
        check_instruction("keywords:letter_frequency", kwargs, "p", "r")


# -- loose scoring ----------------------------------------------------------------------------------


def test_loose_variants_drop_edge_lines_and_asterisks():
    variants = loose_variants("Sure!\n**Body** text\nBye")
    assert variants[:4] == ["Sure!\n**Body** text\nBye", "**Body** text\nBye", "Sure!\n**Body** text", "**Body** text"]
    assert variants[4:] == [v.replace("*", "") for v in variants[:4]]


@pytest.mark.parametrize(
    "instruction_id,kwargs,response",
    [
        ("startend:quotation", {}, 'Here you go:\n"All wrapped."'),
        ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Sure, repeating:\nSay hi. Hi!"),
        ("startend:end_checker", {"end_phrase": "Peace!"}, "Goodbye. Peace!\n(Let me know if you need more.)"),
        ("detectable_format:json_format", {}, '{"a": 1}\nHope this helps!'),
    ],
)
def test_loose_forgives_what_strict_does_not(instruction_id, kwargs, response):
    assert check_instruction(instruction_id, kwargs, "p", response) is False
    assert check_instruction_loose(instruction_id, kwargs, "p", response) is True


def test_loose_never_fails_what_strict_passes():
    for instruction_id, kwargs, response, expected in CASES:
        if expected and response.strip():
            assert check_instruction_loose(instruction_id, kwargs, "p", response), (instruction_id, response)


# -- tokenisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Hello world. How are you? Fine!", ["Hello world.", "How are you?", "Fine!"]),
        ("Dr. Smith met Mr. Jones at 5 p.m. on Monday.", ["Dr. Smith met Mr. Jones at 5 p.m. on Monday."]),
        ("Apples, pears, etc. are fruit. The end.", ["Apples, pears, etc. are fruit.", "The end."]),
        ("J. R. R. Tolkien wrote it. It is long.", ["J. R. R. Tolkien wrote it.", "It is long."]),
        ("Steps:\n1. Open it.\n2. close it", ["Steps:\n1.", "Open it.", "2. close it"]),
        ("Wait... what? Wait... The end.", ["Wait... what?", "Wait...", "The end."]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("(Sentence one.) Sentence two.", ["(Sentence one.)", "Sentence two."]),
        ("Wow!! Great", ["Wow!!", "Great"]),
        ("Pi is 3.14 exactly. Visit example.com today.", ["Pi is 3.14 exactly.", "Visit example.com today."]),
        ("No full stop at the end", ["No full stop at the end"]),
        ("  \n ", []),
    ],
)
def test_split_sentences_follows_punkt_rules(text, expected):
    assert ifeval_text.split_sentences(text) == expected
    assert ifeval_text.count_sentences(text) == len(expected)


def test_custom_lexicon_changes_abbreviation_handling():
    plain = ifeval_text.PunktLexicon(abbreviations=frozenset(), ortho_context={}, sent_starters=frozenset())
    assert ifeval_text.count_sentences("See Dr. Smith.") == 1
    assert ifeval_text.count_sentences("See Dr. Smith.", plain) == 2


@pytest.mark.parametrize(
    "text,expected",
    [
        ("I DON'T know, you're right.", ["I", "DO", "N'T", "know", ",", "you", "'re", "right", "."]),
        ('She said "hi" (twice).', ["She", "said", "``", "hi", "''", "(", "twice", ")", "."]),
        ("AI-DRIVEN tools cannot fail; U.S. rules", ["AI-DRIVEN", "tools", "can", "not", "fail", ";", "U.S.", "rules"]),
        ("Cost: $3,000 at 5:30... ok?!", ["Cost", ":", "$", "3,000", "at", "5:30", "...", "ok", "?", "!"]),
    ],
)
def test_word_tokenize_treebank_style(text, expected):
    assert ifeval_text.word_tokenize(text) == expected


def test_count_words_is_word_character_runs():
    assert ifeval_text.count_words("It's a well-known fact: 3.5 apples!") == 9


# -- scoring ----------------------------------------------------------------------------------------

INPUTS = [
    {
        "key": 1,
        "prompt": "A",
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:title"],
        "kwargs": [{}, {}],
    },
    {
        "key": 2,
        "prompt": "B",
        "instruction_id_list": ["keywords:existence", "length_constraints:number_words"],
        "kwargs": [{"keywords": ["cat"]}, {"num_words": 3, "relation": "less than"}],
    },
    {"key": 3, "prompt": "C", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
]


def test_score_responses_aggregates():
    responses = {"A": "<<T>>\nno commas", "B": "a cat sat here", "C": 'Sure:\n"quoted"'}
    r = score_responses(INPUTS, responses)
    assert [row.strict for row in r.rows] == [[True, True], [True, False], [False]]
    assert [row.loose for row in r.rows] == [[True, True], [True, False], [True]]
    assert r.prompt_strict == pytest.approx(1 / 3)
    assert r.instruction_strict == pytest.approx(3 / 5)
    assert r.prompt_loose == pytest.approx(2 / 3)
    assert r.instruction_loose == pytest.approx(4 / 5)
    assert r.format_adherence == pytest.approx(3 / 3)  # no_comma, title, quotation (loose)
    assert r.ignored_constraint_rate == pytest.approx(1 / 5)
    assert r.by_group["length_constraints"] == {"count": 1, "strict": 0.0, "loose": 0.0}
    assert r.by_instruction["startend:quotation"] == {"count": 1, "strict": 0.0, "loose": 1.0}
    assert set(r.by_group) == {group_of(i) for inp in INPUTS for i in inp["instruction_id_list"]}
    assert set(r.summary()) == {
        "prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose", "format_adherence",
        "ignored_constraint_rate", "num_prompts", "num_instructions", "by_instruction", "by_group",
    }
    d = json.loads(json.dumps(r.to_dict()))
    assert d["rows"][2]["followed_all_loose"] is True and d["num_instructions"] == 5
    assert score_responses(INPUTS, list(responses.values())).to_dict() == r.to_dict()


def test_score_responses_without_format_instructions_has_no_format_figure():
    r = score_responses(INPUTS[1:2], ["a cat"])
    assert r.format_adherence is None and r.instruction_loose == 1.0


def test_score_responses_reports_missing_prompt():
    with pytest.raises(IFEvalDataError, match="key 2"):
        score_responses(INPUTS, {"A": "x", "C": "y"})
    with pytest.raises(IFEvalDataError, match="2 responses for 3 inputs"):
        score_responses(INPUTS, ["x", "y"])


# -- files and matching -----------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_inputs_drops_null_kwargs_and_names_bad_lines(tmp_path):
    hf_style = dict(INPUTS[2], kwargs=[{"num_words": None, "relation": None}])
    path = _write_jsonl(tmp_path / "in.jsonl", [INPUTS[0], hf_style])
    assert load_ifeval_inputs(path)[1]["kwargs"] == [{}]
    _write_jsonl(path, [INPUTS[0], dict(INPUTS[1], kwargs=[{}])])
    with pytest.raises(IFEvalDataError, match=r"in.jsonl:2: 'instruction_id_list' has 2 entries but 'kwargs' has 1"):
        load_ifeval_inputs(path)
    _write_jsonl(path, [dict(INPUTS[1], kwargs=[{"keywords": ["x"]}, {"relation": "at least"}])])
    with pytest.raises(IFEvalDataError, match=r"in.jsonl:1: instruction_id_list\[1\].*num_words"):
        load_ifeval_inputs(path)
    path.write_text(json.dumps(INPUTS[0]) + "\n\n{broken\n")
    with pytest.raises(IFEvalDataError, match="in.jsonl:3: not valid JSON"):
        load_ifeval_inputs(path)


def test_match_responses_by_prompt(tmp_path):
    inputs = list(enumerate(INPUTS, 1))
    shuffled = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": p, "response": p.lower()} for p in "CAB"])
    assert match_responses(inputs, load_responses(shuffled)) == ["a", "b", "c"]
    partial = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "response": p} for p in "AC"])
    with pytest.raises(IFEvalDataError, match=r"in.jsonl:2: no record in .*p.jsonl has this prompt \(key 2"):
        match_responses(inputs, load_responses(partial), "in.jsonl", partial)
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "A", "output": "x"}])
    with pytest.raises(IFEvalDataError, match="b.jsonl:1: field 'response' must be a string"):
        load_responses(bad)


def test_unknown_prompts_are_errors_not_paired_by_order(tmp_path):
    inputs = list(enumerate(INPUTS, 1))
    templated = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"<s>{p}", "response": p} for p in "ABC"])
    with pytest.raises(IFEvalDataError, match=r"t.jsonl:1: prompt '<s>A' is not in in.jsonl"):
        match_responses(inputs, load_responses(templated), "in.jsonl", templated)
    extra = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": p, "response": p} for p in ("A", "B", "Z", "C")])
    with pytest.raises(IFEvalDataError, match=r"e.jsonl:3: prompt 'Z' is not in in.jsonl"):
        match_responses(inputs, load_responses(extra), "in.jsonl", extra)


def test_duplicate_prompts_are_errors(tmp_path):
    inputs = list(enumerate(INPUTS, 1))
    dup = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": p} for p in "ABCB"])
    with pytest.raises(IFEvalDataError, match=r"d.jsonl:4: prompt 'B' already answered on line 2"):
        match_responses(inputs, load_responses(dup), "in.jsonl", dup)


def test_records_without_prompts_need_the_checksum_header(tmp_path):
    inputs = list(enumerate(INPUTS, 1))
    bare = _write_jsonl(tmp_path / "bare.jsonl", [{"response": p} for p in "CAB"])
    with pytest.raises(IFEvalDataError, match=r"bare.jsonl:1: no 'prompt' field.*prompts_sha256"):
        match_responses(inputs, load_responses(bare), "in.jsonl", bare)
    digest = ifeval.prompts_sha256([inp["prompt"] for inp in INPUTS])
    ok = ifeval.write_responses(tmp_path / "ok.jsonl", list("ABC"), ["a", "b", "c"], with_prompts=False)
    assert json.loads(ok.read_text().splitlines()[0]) == {"prompts_sha256": digest}
    assert match_responses(inputs, load_responses(ok)) == ["a", "b", "c"]
    stale = ifeval.write_responses(tmp_path / "stale.jsonl", list("CAB"), ["c", "a", "b"], with_prompts=False)
    with pytest.raises(IFEvalDataError, match=r"stale.jsonl:1: prompts_sha256 .* does not match in.jsonl"):
        match_responses(inputs, load_responses(stale), "in.jsonl", stale)
    short = ifeval.write_responses(tmp_path / "short.jsonl", list("AB"), ["a", "b"], with_prompts=False)
    with pytest.raises(IFEvalDataError, match=r"short.jsonl: 2 responses for the 3 prompts of in.jsonl"):
        match_responses(inputs, load_responses(short), "in.jsonl", short)
    moved = _write_jsonl(tmp_path / "m.jsonl", [{"prompts_sha256": digest}] + [
        {"prompt": p, "response": p} for p in "BAC"])
    with pytest.raises(IFEvalDataError, match=r"m.jsonl:2: prompt 'B' is record 2 of in.jsonl, not record 1"):
        match_responses(inputs, load_responses(moved), "in.jsonl", moved)
    with_prompts = ifeval.write_responses(tmp_path / "w.jsonl", list("ABC"), ["a", "b", "c"])
    assert json.loads(with_prompts.read_text().splitlines()[0]) == {"prompt": "A", "response": "a"}


def test_cli_prints_figures_and_writes_results(tmp_path, capsys):
    inputs = _write_jsonl(tmp_path / "in.jsonl", INPUTS)
    responses = _write_jsonl(
        tmp_path / "resp.jsonl",
        [{"prompt": p, "response": r} for p, r in (("A", "<<T>>\nok"), ("B", "cat"), ("C", '"q"'))],
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["ifeval", "--responses", str(responses), "--input", str(inputs), "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "prompt-level strict       100.00 %" in printed
    assert "format adherence          100.00 %" in printed
    assert "ignored-constraint rate     0.00 %" in printed
    rows = [json.loads(x) for x in (out / "ifeval_results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [1, 2, 3] and all(r["followed_all_strict"] for r in rows)
    summary = json.loads((out / "ifeval_summary.json").read_text())
    assert summary["prompt_loose"] == 1.0 and "rows" not in summary
    missing = _write_jsonl(tmp_path / "miss.jsonl", [{"prompt": "A", "response": "x"}])
    from jaxtune.cli.main import main

    assert main(["eval", "ifeval", "--responses", str(missing), "--input", str(inputs), "--out", str(out)]) == 2
    assert "in.jsonl:2: no record" in capsys.readouterr().err
    shuffled = _write_jsonl(tmp_path / "shuf.jsonl", [{"response": r} for r in ('"q"', "cat", "<<T>>\nok")])
    assert main(["eval", "ifeval", "--responses", str(shuffled), "--input", str(inputs), "--out", str(out)]) == 2
    assert "shuf.jsonl:1: no 'prompt' field" in capsys.readouterr().err


# -- the official reference figures -----------------------------------------------------------------


def test_gpt4_reference_figures(assets_dir):
    """Official IFEval code on the official GPT-4 responses: 77.08 / 83.69 / 79.67 / 85.61 (SOURCES.md)."""
    data = assets_dir / "data"
    inputs = load_ifeval_inputs(data / "ifeval_input_data.jsonl")
    assert {i for inp in inputs for i in inp["instruction_id_list"]} <= set(CHECKERS)
    responses = {rec["prompt"]: rec["response"] for _, rec in load_responses(data / "ifeval_responses_gpt4.jsonl")}
    r = score_responses(inputs, responses)
    assert (r.num_prompts, r.num_instructions) == (541, 834)
    assert sum(row.followed_all_strict for row in r.rows) == 417
    assert sum(sum(row.strict) for row in r.rows) == 698
    assert sum(row.followed_all_loose for row in r.rows) == 431
    assert sum(sum(row.loose) for row in r.rows) == 714
    figures = (r.prompt_strict, r.instruction_strict, r.prompt_loose, r.instruction_loose)
    assert [round(100 * x, 2) for x in figures] == [77.08, 83.69, 79.67, 85.61]


def test_gpt4_responses_without_prompts_pair_only_with_the_checksum(assets_dir, tmp_path):
    """The same figures from a file without prompts in input order; shuffled, it is refused, not mis-scored."""
    data = assets_dir / "data"
    input_path = data / "ifeval_input_data.jsonl"
    inputs = ifeval.load_inputs_with_lines(input_path)
    prompts = [inp["prompt"] for _, inp in inputs]
    by_prompt = {rec["prompt"]: rec["response"] for _, rec in load_responses(data / "ifeval_responses_gpt4.jsonl")}
    headed = ifeval.write_responses(tmp_path / "h.jsonl", prompts, [by_prompt[p] for p in prompts], with_prompts=False)
    r = score_responses([inp for _, inp in inputs], match_responses(inputs, load_responses(headed), input_path, headed))
    assert round(100 * r.prompt_strict, 2) == 77.08 and round(100 * r.instruction_loose, 2) == 85.61
    shuffled = prompts[1:] + prompts[:1]
    stale = ifeval.write_responses(tmp_path / "s.jsonl", shuffled, [by_prompt[p] for p in shuffled],
                                   with_prompts=False)
    with pytest.raises(IFEvalDataError, match=r"s.jsonl:1: prompts_sha256 .* does not match"):
        match_responses(inputs, load_responses(stale), input_path, stale)


def test_repeated_input_prompts_cannot_be_matched_by_prompt(tmp_path):
    inputs = list(enumerate([INPUTS[0], INPUTS[1], dict(INPUTS[2], prompt="A")], 1))
    resp = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": p, "response": p} for p in "AB"])
    with pytest.raises(IFEvalDataError, match=r"in.jsonl:3: prompt repeats line 1"):
        match_responses(inputs, load_responses(resp), "in.jsonl", resp)
    headed = ifeval.write_responses(tmp_path / "h.jsonl", ["A", "B", "A"], ["a", "b", "c"], with_prompts=False)
    assert match_responses(inputs, load_responses(headed), "in.jsonl", headed) == ["a", "b", "c"]
