import pytest

from jaxtune.jsonl import read_jsonl, write_jsonl


class _Custom(ValueError):
    pass


def test_round_trip_keeps_line_numbers_and_unicode(tmp_path):
    path = write_jsonl(tmp_path / "sub" / "a.jsonl", ({"i": i, "text": "café ✓"} for i in range(2)))
    assert "café ✓" in path.read_text(encoding="utf-8")
    path.write_text("\ufeff" + path.read_text(encoding="utf-8").replace("\n", "\n\n", 1), encoding="utf-8")
    assert read_jsonl(path) == [(1, {"i": 0, "text": "café ✓"}), (3, {"i": 1, "text": "café ✓"})]


def test_a_json_string_holding_a_line_separator_stays_one_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")
    assert [n for n, _ in read_jsonl(path)] == [1, 2]


@pytest.mark.parametrize("line, message", [("{broken", r"a.jsonl:2: not valid JSON \(.* at column 2\)"),
                                           ("[1, 2]", r"a.jsonl:2: expected a JSON object, got list")])
def test_bad_line_raises_the_callers_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    path.write_text('{"ok": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)
    with pytest.raises(_Custom, match=message):
        read_jsonl(path, _Custom)


def test_a_key_given_twice_is_an_error_naming_the_line(tmp_path):
    """json keeps the last of two equal keys without a word; an IFEval input or response file with one would
    silently score the wrong text."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "response": "x"}\n{"prompt": "b", "response": "y", "response": "z"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2: key 'response' appears twice in one JSON object"):
        read_jsonl(path)
