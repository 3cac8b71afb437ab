"""Fuzzing the readers users feed files to: data records (JSON, JSONL, CSV, text) and recipes (YAML, --set).

Every malformed input must end in a ValueError or OSError whose message names the file (and line, where the
error has one), or be accepted; any other exception type, or a message that does not say where, fails.
The `ci` profile is derandomized with no example database, so a run is repeatable; set HYPOTHESIS_PROFILE
to use another.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtune.data.formats import load_records
from jaxtune.data.report import RecordError
from jaxtune.recipe import load_recipe

settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@contextmanager
def _file(name: str, data: bytes):
    """`data` written to a fresh temporary file `name` (hypothesis reruns a test body, so no tmp_path)."""
    d = tempfile.mkdtemp(prefix="jaxtune-fuzz-")
    try:
        path = Path(d) / name
        path.write_bytes(data)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates become invalid UTF-8 bytes


# ------------------------------------------------------------------------------------------- strategies

ODD = ["\ud800", "\udcff", "\u2028", "\u2029", "\x85", "\x0c", "\ufeff", "\x00", "\r", "\t", "\\", '"', "\n"]
chars = st.one_of(st.characters(), st.sampled_from(ODD))
texts = st.text(chars, max_size=12)
KEYS = ["instruction", "input", "output", "messages", "conversations", "prompt", "completion", "response", "text",
        "system", "history", "instances", "tools", "role", "content", "from", "value", "tool_calls", "category"]
keys = st.one_of(st.sampled_from(KEYS), texts)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts, st.sampled_from(
    ["user", "assistant", "system", "tool", "gpt", "human", "function_call", ""]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4),
                      max_leaves=12)
records = st.dictionaries(keys, values, max_size=5)
# Tokens that json.dumps never writes but a file may hold.
JUNK = ["9" * 5000, "1e999", "-1e999", "NaN", "Infinity", "[" * 3000, "{" * 3000, '"\\ud800"', '"\\udc00x"',
        '{"a": 1, "a": 2}', "\ufeff", "\x00", ",", "]", "}", '"', "\\", "\u2028"]


@st.composite
def json_texts(draw, value=records):
    """JSON text of a record, or that text truncated, with a junk token spliced in, or with duplicated keys."""
    text = json.dumps(draw(value), ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(["keep", "keep", "truncate", "splice", "duplicate"]))
    if how == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "splice":
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.one_of(st.sampled_from(JUNK), texts)) + text[i:]
    elif how == "duplicate" and text.startswith("{") and len(text) > 2:
        text = '{"output": 1, "output": "x", ' + text[1:]
    return text


@st.composite
def bom(draw) -> str:
    return draw(st.sampled_from(["", "", "\ufeff", "\ufeff\ufeff"]))


def _assert_names_file(err: Exception, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg, f"{type(err).__name__} does not name the file: {msg[:300]}"
    if isinstance(err, RecordError):
        assert re.match(rf"{re.escape(str(path))}:(\d+|row \d+)\b", err.source), err.source
        assert msg.startswith(err.source)


def _load_both_ways(path: Path) -> None:
    """Both on_error modes; a skip run writes its rejects file too (reprs of junk records)."""
    for on_error in ("raise", "skip"):
        try:
            load_records(path, on_error=on_error, rejects_path=path.parent / "rejects.jsonl")
        except (ValueError, OSError) as e:
            _assert_names_file(e, path)


# ------------------------------------------------------------------------------------------- data readers

@given(st.binary(max_size=300), st.sampled_from(["d.json", "d.jsonl", "d.csv", "d.txt"]))
def test_random_bytes(data, name):
    with _file(name, data) as path:
        _load_both_ways(path)


@given(bom(), st.lists(st.one_of(json_texts(), texts), max_size=6), st.sampled_from(["\n", "\r\n", "\r"]))
def test_json_lines(prefix, lines, newline):
    with _file("d.jsonl", _encode(prefix + newline.join(lines))) as path:
        _load_both_ways(path)


@given(bom(), st.lists(json_texts(st.one_of(records, values)), max_size=5), st.booleans(), st.booleans())
def test_json_arrays_and_objects(prefix, items, array, close):
    body = ("[" + ",\n".join(items) + ("]" if close else "")) if array else "\n".join(items)
    with _file("d.json", _encode(prefix + body)) as path:
        _load_both_ways(path)


@given(bom(), st.lists(st.lists(st.one_of(st.sampled_from(KEYS), texts), max_size=5), max_size=6),
       st.sampled_from(["written", "raw"]))
def test_csv(prefix, rows, how):
    if how == "written":
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        body = buf.getvalue()
    else:
        body = "\n".join(",".join(r) for r in rows)
    with _file("d.csv", _encode(prefix + body)) as path:
        _load_both_ways(path)


@given(bom(), st.text(chars, max_size=200))
def test_plain_text(prefix, body):
    with _file("d.txt", _encode(prefix + body)) as path:
        _load_both_ways(path)


def test_deep_nesting_is_a_bad_record(tmp_path):
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + deep + "\n")
    _load_both_ways(path)
    path = tmp_path / "deep.json"
    path.write_text("[" + deep + "]")
    _load_both_ways(path)


# ------------------------------------------------------------------------------------------- recipes

RECIPE = {"model": {"path": "some/model"}, "data": {"train": "data.json", "seq_len": 64},
          "train": {"steps": 10, "batch_size": 4}, "output": {"run_dir": "runs/x"}}
SECTIONS = {"model": ["path", "tokenizer", "dtype", "param_dtype", "remat", "attention_impl", "add_special_tokens"],
            "data": ["train", "validation", "seq_len", "format", "columns", "on_error", "packing", "chat_template"],
            "train": ["mode", "steps", "batch_size", "freeze", "eval_every", "loss_chunk", "nan_policy"],
            "lora": ["rank", "alpha", "dropout", "target_modules", "rank_pattern"],
            "optim": ["lr", "grad_accum_steps", "schedule", "warmup_steps", "weight_decay"],
            "mesh": ["data", "fsdp", "model", "tensor"], "output": ["run_dir", "export"],
            "forgetting": ["general_text", "n_samples"]}
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.one_of(keys, st.integers()), c, max_size=3),
    max_leaves=8)


@st.composite
def recipes(draw) -> dict:
    """The minimal recipe with a few keys (known or not) set to values of any type."""
    raw = json.loads(json.dumps(RECIPE))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*SECTIONS, "junk"]))
        key = draw(st.sampled_from(SECTIONS.get(section, ["x"]) + ["nope"]))
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            continue
        target[key] = draw(yaml_values)
    if draw(st.booleans()):
        raw[draw(st.sampled_from(list(raw)))] = draw(yaml_values)
    return raw


@st.composite
def yaml_texts(draw) -> str:
    """Dumped recipes, then mangled: tabs, broken indentation, anchors and aliases, truncation, raw text."""
    try:
        text = yaml.safe_dump(draw(recipes()), allow_unicode=draw(st.booleans()), sort_keys=False)
    except yaml.YAMLError:
        text = "model: {}\n"
    lines = text.splitlines()
    how = draw(st.sampled_from(["keep", "tabs", "indent", "anchor", "alias_bomb", "truncate", "raw", "splice"]))
    if how == "tabs":
        lines = [ln.replace("  ", "\t", 1) for ln in lines]
    elif how == "indent" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = " " * draw(st.integers(0, 5)) + lines[i].lstrip()
    elif how == "anchor":
        lines = ["base: &b {path: x, dtype: [1, 2]}", "self: &s [*s]"] + lines + ["model: *b"]
    elif how == "alias_bomb":
        bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                        for p, c in zip("abcdefg", "bcdefgh")]
        lines = bomb + lines + ["lora: {target_modules: *h}"]
    elif how == "truncate":
        text = "\n".join(lines)
        return text[:draw(st.integers(0, len(text)))]
    elif how == "raw":
        return draw(st.text(chars, max_size=80))
    elif how == "splice" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, draw(st.one_of(texts, st.sampled_from(["- a", "? [x]", ": y", "!!python/object:os.system x",
                                                                "&x", "*nope", "%YAML 1.1", "---", "...", "{", "|"]))))
    return "\n".join(lines) + "\n"


def _load_recipe(path: Path, overrides=()) -> None:
    try:
        load_recipe(path, list(overrides))
    except (ValueError, OSError) as e:
        msg = str(e)
        assert msg.startswith((str(path), "--set ")), f"{type(e).__name__} does not say where: {msg[:300]}"
        assert "\n" not in msg and "<unicode string>" not in msg, msg  # one line, no PyYAML position blocks


@given(bom(), yaml_texts())
def test_recipe_yaml(prefix, text):
    with _file("r.yaml", _encode(prefix + text)) as path:
        _load_recipe(path)


@given(st.binary(max_size=200))
def test_recipe_random_bytes(data):
    with _file("r.yaml", data) as path:
        _load_recipe(path)


override_keys = st.lists(st.one_of(st.sampled_from([*SECTIONS, *(k for ks in SECTIONS.values() for k in ks), ""]), texts),
                         min_size=1, max_size=3).map(".".join)


@given(st.lists(st.tuples(override_keys, st.sampled_from(["=", "", "=="]), st.one_of(texts, st.sampled_from(
    ["5", "null", "[a, b]", "{x: 1}", "1e-4", "[", "{a: 1, a: 2}", "*x", "&a [*a]"]))), min_size=1, max_size=3))
def test_recipe_overrides(items):
    text = yaml.safe_dump(RECIPE)
    with _file("r.yaml", text.encode()) as path:
        _load_recipe(path, [k + sep + v for k, sep, v in items])
