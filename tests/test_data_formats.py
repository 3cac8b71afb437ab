"""Reading, layout detection, normalisation and validation of instruction data (inline fixtures and the real
Alpaca, self-instruct and IFEval files)."""

import json

import pytest

from jaxtune.data.formats import load_records
from jaxtune.data.report import RecordError
from jaxtune.data.formats import read_records


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


# ----------------------------------------------------------------------------------------- layouts

def test_alpaca_with_input_system_history_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"question": "Add.", "context": "1 and 2", "answer": "3", "system": "Be exact.",
         "history": [["Hello", "Hi there"]]},
    ])
    (c,), report = load_records(path, columns={"instruction": "question", "input": "context", "output": "answer"})
    assert report.format == "alpaca" and report.records_in == report.records_out == 1
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert c.messages[3] == {"role": "user", "content": "Add.\n\n1 and 2", "instruction": "Add.", "input": "1 and 2"}
    assert c.messages[4]["content"] == "3" and c.source == f"{path}:1"


def test_sharegpt_with_tool_call_and_observation(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{
        "system": "You can call tools.",
        "tools": json.dumps([{"name": "add", "parameters": {}}]),
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "4."},
        ]}])
    (c,), report = load_records(path)
    assert report.format == "sharegpt"
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    assert c.messages[2]["tool_calls"] == [call]
    assert c.tools == [{"name": "add", "parameters": {}}]


def test_openai_messages_text_parts_and_reasoning(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"category": "qa", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
    ]}])
    (c,), report = load_records(path)
    assert report.format == "messages" and c.meta == {"category": "qa"}
    assert c.messages == [{"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."}]


def test_prompt_completion_and_response_alias(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in (1, 2)])
    convs, report = load_records(path)
    assert report.format == "prompt_completion" and [c.messages[-1]["content"] for c in convs] == ["A1", "A2"]
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "response": "A"}])
    (c,), _ = load_records(path)
    assert c.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_json_array_records_carry_their_line_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"},'
                    '  {"instruction": "e", "output": "f"}\n]\n')
    convs, _ = load_records(path)
    assert [c.source for c in convs] == [f"{path}:2 record 0", f"{path}:4 record 1", f"{path}:5 record 2"]


def test_json_file_of_lines_or_single_object(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    convs, _ = load_records(path)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:2"]
    path.write_text('{\n  "data": [{"prompt": "a", "completion": "b"}]\n}\n')
    with pytest.raises(RecordError, match=r"lines\.json:1: wrong type: the file is a single JSON object"):
        load_records(path)


def test_csv_rows_and_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nA,,"line one\nline two"\nB,x,y\n')
    convs, report = load_records(path)
    assert report.format == "alpaca" and [c.source for c in convs] == [f"{path}:2", f"{path}:4"]
    assert convs[0].messages[1]["content"] == "line one\nline two"
    path.write_text("instruction,output\nA,B,extra\n")
    with pytest.raises(RecordError, match=r"d\.csv:2: wrong type: row has more fields than the header"):
        load_records(path)


def test_parquet_and_datasets_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": 7}]
    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "completion": ["A1", ""]}), tmp_path / "d.parquet")
    with pytest.raises(RecordError, match=r"d\.parquet:row 2: empty assistant turn \(completion\)"):
        load_records(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows[:1] * 3).save_to_disk(str(tmp_path / "saved"))
    convs, _ = load_records(tmp_path / "saved")
    assert len(convs) == 3 and convs[2].source == f"{tmp_path / 'saved'}:row 3"
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part.jsonl", rows[:1] * 2)
    convs, _ = load_records(tmp_path / "folder")
    assert [c.messages[-1]["content"] for c in convs] == ["A1", "A1"]


def test_plain_text_paragraphs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("First para\ncontinues.\n\n\nSecond.\n")
    convs, report = load_records(path)
    assert report.format == "text"
    assert [(c.text, c.source) for c in convs] == [("First para\ncontinues.", f"{path}:1"), ("Second.", f"{path}:5")]


def test_unknown_layout_names_keys_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(RecordError, match=r"x\.jsonl:1: unknown format: cannot tell .*\['a', 'q'\].*data.format"):
        load_records(path)


# ----------------------------------------------------------------------------------------- malformed input

def msgs(*turns):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


MSG_GOOD = msgs(("user", "Hi"), ("assistant", "Hello."))
UTF8_BAD = '{"messages": [{"role": "user", "content": "caf@C3@"}, {"role": "assistant", "content": "x"}]}'
BAD = [  # (good record of the same layout, bad line, kind, field); the bad line goes on line 2
    (json.dumps(GOOD), json.dumps({"instruction": "x", "input": ""}), "missing field", "output"),
    (json.dumps(GOOD), json.dumps({"instruction": "x", "output": "   "}), "empty assistant turn", "output"),
    (MSG_GOOD, json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
     "missing field", "messages[0].content"),
    (MSG_GOOD, msgs(("user", 5), ("assistant", "a")), "wrong type", "messages[0].content"),
    (MSG_GOOD, msgs(("bot", "hi"), ("assistant", "a")), "unknown role", "messages[0].role"),
    (MSG_GOOD, msgs(("user", "a"), ("assistant", "")), "empty assistant turn", "messages[1].content"),
    (MSG_GOOD, msgs(("user", "a"), ("user", "b"), ("assistant", "c")), "turn order", "messages[1]"),
    (MSG_GOOD, msgs(("user", "a")), "turn order", "messages[0]"),
    (MSG_GOOD, msgs(("user", "a"), ("assistant", "b"), ("system", "c"), ("user", "d"), ("assistant", "e")),
     "turn order", "messages[2]"),
    (MSG_GOOD, msgs(("user", "a"), ("tool", "b"), ("assistant", "c")), "turn order", "messages[1]"),
    (MSG_GOOD, UTF8_BAD, "invalid UTF-8", "messages[0].content"),
    (MSG_GOOD, '{"messages": [}', "invalid JSON", None),
]


def write_raw(path, lines):
    """Lines joined as UTF-8, with the marker @C3@ turned into a lone 0xC3 byte (invalid UTF-8)."""
    path.write_bytes("\n".join(lines).encode("utf-8").replace(b"@C3@", b"\xc3"))
    return path


@pytest.mark.parametrize("good,line,kind,field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_each_malformed_record_raises_with_file_line_and_field(tmp_path, good, line, kind, field):
    path = write_raw(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(RecordError) as info:
        load_records(path)
    err = info.value
    assert (err.source, err.kind, err.field_name) == (f"{path}:2", kind, field)
    assert str(err).startswith(f"{path}:2: {kind}") and "on_error: skip" in str(err)


def test_invalid_utf8_byte_is_in_the_file(tmp_path):
    path = write_raw(tmp_path / "u.jsonl", [UTF8_BAD])
    assert b"caf\xc3\"" in path.read_bytes()


def test_skip_mode_counts_reasons_and_writes_rejects(tmp_path):
    bad = [b for b in BAD if b[0] == MSG_GOOD]
    path = write_raw(tmp_path / "mixed.jsonl", [MSG_GOOD] + [b[1] for b in bad] + [MSG_GOOD])
    rejects = tmp_path / "out" / "rejects.jsonl"
    convs, report = load_records(path, on_error="skip", rejects_path=rejects)
    assert len(convs) == 2 and report.records_in == len(bad) + 2 and report.records_out == 2
    expected = {}
    for _, _, kind, _ in bad:
        expected[kind] = expected.get(kind, 0) + 1
    assert report.skipped == expected
    rows = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"{path}:{i}" for i in range(2, 2 + len(bad))]
    assert [(r["kind"], r["field"]) for r in rows] == [(b[2], b[3]) for b in bad]
    assert rows[0]["record"] == json.loads(bad[0][1]) and rows[-1]["record"] is None
    assert f"skipped: {len(bad)}" in report.summary() and str(rejects) in report.summary()


def test_broken_json_array_raises_even_when_skipping(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]')
    with pytest.raises(RecordError, match=r"a\.json:3: invalid JSON: .*store the data as JSONL"):
        load_records(path, on_error="skip")


def test_wrong_top_level_and_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", ["[1, 2]", json.dumps(GOOD)])
    with pytest.raises(RecordError, match=r"l\.jsonl:1: wrong type: expected an object, got list"):
        load_records(path)
    with pytest.raises(ValueError, match="unknown key"):
        load_records(path, columns={"answer": "x"})
    with pytest.raises(ValueError, match="on_error"):
        load_records(path, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records("data/nope.jsonl")


# ----------------------------------------------------------------------------------------- real data

def test_real_alpaca_files(assets_dir):
    for name in ("alpaca_data_1k.json", "alpaca_en_demo.json"):
        path = assets_dir / "data" / name
        raw = json.loads(path.read_text())
        convs, report = load_records(path)
        assert report.format == "alpaca" and len(convs) == len(raw) == report.records_out
        with_input = sum(bool(r["input"].strip()) for r in raw)
        assert sum("input" in c.messages[0] for c in convs) == with_input
        assert [c.messages[-1]["content"] for c in convs] == [r["output"] for r in raw]


def test_real_self_instruct_instances(assets_dir):
    path = assets_dir / "data" / "self_instruct_seed_tasks.jsonl"
    raw = [json.loads(x) for x in path.read_text().splitlines()]
    convs, report = load_records(path)
    assert report.format == "alpaca" and report.records_out == len(raw)
    pairs = [(r["instruction"], i["input"], i["output"]) for r in raw for i in r["instances"]]
    assert len(convs) == len(pairs)
    for c, (instruction, inp, output) in zip(convs, pairs):
        assert c.messages[0].get("instruction", c.messages[0]["content"]) == instruction
        assert c.messages[0].get("input", "") == (inp if inp.strip() else "") and c.messages[1]["content"] == output


def test_instances_expand_to_one_conversation_each(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "Classify.", "instances": [
        {"input": "a", "output": "x"}, {"input": "b", "output": "y"}]}])
    convs, report = load_records(path)
    assert report.records_out == 1
    assert [(c.source, c.messages[1]["content"]) for c in convs] == [
        (f"{path}:1 instance 1", "x"), (f"{path}:1 instance 2", "y")]
    write_jsonl(path, [{"instruction": "Classify.", "instances": [{"input": "a", "output": "x"}, {"input": "b"}]}])
    with pytest.raises(RecordError, match=r"s\.jsonl:1: missing field \(instances\[1\]\.output\)"):
        load_records(path)


def test_real_ifeval_prompts_need_a_completion_and_responses_load(assets_dir):
    prompts = assets_dir / "data" / "ifeval_input_data.jsonl"
    with pytest.raises(RecordError, match=r"ifeval_input_data\.jsonl:1: missing field \(completion\)"):
        load_records(prompts)
    with pytest.raises(ValueError, match="all 541 records were rejected"):
        load_records(prompts, on_error="skip")
    convs, report = load_records(assets_dir / "data" / "ifeval_responses_gpt4.jsonl")
    assert report.format == "prompt_completion"
    expected = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    assert [c.messages[0]["content"] for c in convs] == expected


def test_real_text_corpus(assets_dir):
    convs, _, _ = read_records(assets_dir / "data" / "tinyshakespeare_input.txt")
    assert convs[0].source.endswith("tinyshakespeare_input.txt:1") and convs[0].text.startswith("First Citizen:")
    assert all(c.text.strip() and not c.messages for c in convs)


# ----------------------------------------------------------------------------------------- duplicated keys

DUP_LINE = '{"instruction": "a", "output": "first", "output": "second"}'


def test_duplicate_json_key_in_a_line_is_a_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), DUP_LINE, json.dumps(GOOD)])
    with pytest.raises(RecordError) as info:
        load_records(path)
    err = info.value
    assert (err.source, err.kind, err.field_name) == (f"{path}:2", "duplicate key", "output")
    assert str(err).startswith(f"{path}:2: duplicate key (output)")
    convs, report = load_records(path, on_error="skip")
    assert len(convs) == 2 and report.skipped == {"duplicate key": 1}


def test_duplicate_key_nested_and_in_json_arrays(tmp_path):
    nested = '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}'
    path = write_jsonl(tmp_path / "n.jsonl", [nested])
    with pytest.raises(RecordError, match=r"n\.jsonl:1: duplicate key \(role\)"):
        load_records(path)
    arr = tmp_path / "a.json"
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n" + DUP_LINE + ",\n" + json.dumps(GOOD) + "\n]")
    with pytest.raises(RecordError, match=r"a\.json:3 record 1: duplicate key \(output\)"):
        load_records(arr)
    convs, report = load_records(arr, on_error="skip")
    assert len(convs) == 2 and report.skipped == {"duplicate key": 1}


def test_duplicate_csv_column_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output,output\na,b,c\n")
    with pytest.raises(RecordError, match=r"d\.csv:1: duplicate key \(output\)"):
        load_records(path, on_error="skip")


def test_json_lines_split_only_at_line_ends(tmp_path):
    # U+2028 and U+0085 may stand unescaped in a JSON string; str.splitlines() would cut the record there.
    rec = {"instruction": "a\u2028b\x85c", "output": "d"}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    convs, report = load_records(path)
    assert report.records_in == 2 and convs[0].messages[0]["content"] == "a\u2028b\x85c"


def test_huge_integer_is_a_bad_record_not_a_crash(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [json.dumps(GOOD), '{"instruction": ' + "9" * 5000 + "}"])
    with pytest.raises(RecordError, match=r"h\.jsonl:2: invalid JSON"):
        load_records(path)


def test_csv_field_over_the_csv_limit_names_file_and_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("instruction,output\na,b\n\"" + "x" * 200_000 + "\",c\n")
    with pytest.raises(RecordError, match=r"big\.csv:\d+: invalid CSV: field larger than field limit"):
        load_records(path, on_error="skip")
