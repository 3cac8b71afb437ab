"""prepare_dataset end to end on the real Alpaca data and stories260K tokenizer: counts that add up, the
over-length policy, the tokenized cache, validation splits, skip mode; DataConfig checks; `jaxtune data stats`."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxtune.cli.main import main
from jaxtune.data.chat import builtin_template
from jaxtune.data.config import DataConfig
from jaxtune.data.formats import load_records
from jaxtune.data.loader import make_loader, pad_id_for
from jaxtune.data.prepare import prepare_dataset
from jaxtune.data.report import RecordError
from jaxtune.data import prepare as prepare_mod
from jaxtune.data.tokenize import tokenize_conversation


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def alpaca(assets_dir):
    return str(assets_dir / "data" / "alpaca_data_1k.json")


@pytest.fixture(scope="module")
def full_lengths(tok, alpaca):
    """Token counts of every Alpaca conversation before any policy, computed independently."""
    convs, _ = load_records(alpaca)
    template = builtin_template("alpaca")
    return [tokenize_conversation(c, tok, template) for c in convs]


def cfg(path, tmp_path, **kw):
    base = {"chat_template": "alpaca", "seq_len": 256, "cache_dir": str(tmp_path / "cache")}
    return DataConfig(train=str(path), **{**base, **kw})


def test_truncate_policy_counts_and_examples(tok, alpaca, full_lengths, tmp_path):
    train, val, report = prepare_dataset(cfg(alpaca, tmp_path, val_fraction=0.1), tok)
    limit = 256 + 1
    over = [(ids, m) for ids, m in full_lengths if ids.size > limit]
    prompt_fills = sum(not m[1:limit].any() for _, m in over)
    assert report.records_in == report.examples_in == 1000
    assert report.truncated == len(over) - prompt_fills > 0
    assert report.dropped == ({"prompt fills seq_len": prompt_fills} if prompt_fills else {})
    assert len(train) + len(val) == report.examples_out == 1000 - prompt_fills
    assert 100 - prompt_fills <= len(val) <= 100
    for ex in train + val:
        n = ex["input_ids"].size
        assert 1 <= n <= 256 and ex["targets"].size == ex["loss_mask"].size == n
        assert np.array_equal(ex["input_ids"][1:], ex["targets"][:-1]) and ex["loss_mask"].any()
    assert report.tokens == sum(ex["input_ids"].size for ex in train + val)
    assert report.target_tokens == sum(int(ex["loss_mask"].sum()) for ex in train + val)
    assert "truncated" in report.summary()


def test_drop_policy(tok, alpaca, full_lengths, tmp_path):
    train, val, report = prepare_dataset(cfg(alpaca, tmp_path, overlong="drop"), tok)
    over = sum(ids.size > 257 for ids, _ in full_lengths)
    assert report.dropped == {"longer than seq_len": over} and report.truncated == 0
    assert len(train) == 1000 - over and val == []


def test_cache_hit_skips_tokenization_and_settings_change_misses(tok, alpaca, tmp_path, monkeypatch):
    config = cfg(alpaca, tmp_path)
    train, _, report = prepare_dataset(config, tok)
    assert not report.cache_hit

    def boom(*a, **k):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr(prepare_mod, "tokenize_conversation", boom)
    again, _, cached = prepare_dataset(config, tok)
    assert cached.cache_hit and cached.examples_out == report.examples_out
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(train, again) for k in a)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_dataset(cfg(alpaca, tmp_path, train_on="all"), tok)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_dataset(cfg(alpaca, tmp_path, chat_template="chatml"), tok)


def test_cache_key_follows_file_content(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    _, _, first = prepare_dataset(cfg(path, tmp_path), tok)
    _, _, second = prepare_dataset(cfg(path, tmp_path), tok)
    path.write_text(json.dumps({"instruction": "a", "output": "changed"}) + "\n")
    _, _, third = prepare_dataset(cfg(path, tmp_path), tok)
    assert (first.cache_hit, second.cache_hit, third.cache_hit) == (False, True, False)


def test_skip_mode_counts_load_and_template_rejects(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    tool = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
                         {"role": "tool", "content": "1"}, {"role": "assistant", "content": "One."}]}
    path.write_text("\n".join([json.dumps(good), "{broken", json.dumps(tool), json.dumps(good)]) + "\n")
    with pytest.raises(RecordError, match=r"mixed\.jsonl:2: invalid JSON"):
        prepare_dataset(cfg(path, tmp_path, cache_dir=None), tok)
    train, _, report = prepare_dataset(cfg(path, tmp_path, on_error="skip"), tok)
    assert len(train) == 2 and report.skipped == {"invalid JSON": 1, "template error": 1}
    rows = [json.loads(x) for x in open(report.rejects_path)]
    assert [(r["source"], r["kind"]) for r in rows] == [(f"{path}:2", "invalid JSON"), (f"{path}:3", "template error")]
    assert str(tmp_path / "cache") in report.rejects_path
    path.write_text("\n".join([json.dumps(good), json.dumps(tool)]) + "\n")
    with pytest.raises(RecordError, match=r"mixed\.jsonl:2: template error.*alpaca template supports"):
        prepare_dataset(cfg(path, tmp_path), tok)


def test_validation_file_text_data_and_loader(tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe cat sat on a mat.\n")
    val = tmp_path / "v.txt"
    val.write_text("A dog ran.\n")
    train, val_ex, report = prepare_dataset(DataConfig(train=str(text), validation=str(val), seq_len=16,
                                                       cache_dir=None), tok)
    assert report.format == "text" and len(train) == 2 and len(val_ex) == 1
    for ex in train:
        assert ex["loss_mask"].all() and ex["targets"][-1] == tok.eos_token_id
    assert train[0]["input_ids"][0] == tok.bos_token_id
    batch = next(make_loader(train, 2, 16, pad_id=pad_id_for(tok)))
    assert batch["input_ids"].shape == (2, 16) and (batch["input_ids"][batch["segment_ids"] == 0] == 2).all()


def test_chat_data_without_template_names_the_fix(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ValueError, match="has no chat template; set data.chat_template"):
        prepare_dataset(DataConfig(train=str(path), cache_dir=None), tok)


@pytest.mark.parametrize("kw,message", [
    ({"train": ""}, "data.train"),
    ({"seq_len": 1}, "data.seq_len must be an integer >= 2"),
    ({"seq_len": "512"}, "data.seq_len"),
    ({"train_on": "assistants"}, "data.train_on must be one of assistant, all, last_turn"),
    ({"overlong": "cut"}, "data.overlong"),
    ({"on_error": "ignore"}, "data.on_error"),
    ({"format": "chatgpt"}, "data.format"),
    ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"val_fraction": 0.1, "validation": "v.json"}, "not both"),
    ({"columns": {"answer": "x"}}, "unknown key"),
    ({"chat_template": "vicuna"}, "data.chat_template"),
    ({"packing": "yes"}, "data.packing"),
    ({"num_epochs": 0}, "data.num_epochs"),
])
def test_data_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"train": "d.json", **kw})


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_stats_command_on_real_data(stories_dir, alpaca, full_lengths, capsys):
    code, out = run_cli(["data", "stats", alpaca, "--tokenizer", str(stories_dir), "--seq-len", "256",
                         "--template", "alpaca", "--json"], capsys)
    assert code == 0
    stats = json.loads(out.out)
    lengths = np.asarray([ids.size - 1 for ids, _ in full_lengths])
    assert stats["records"] == stats["conversations"] == 1000
    assert stats["over_seq_len"] == int((lengths > 256).sum())
    assert stats["tokens"]["max"] == int(lengths.max()) and stats["tokens"]["total"] == int(lengths.sum())
    assert sum(c for _, c in stats["histogram"]) == 1000
    assert 0 < stats["padded_efficiency"] < stats["packing_efficiency"] <= 1
    code, out = run_cli(["data", "stats", alpaca, "--tokenizer", str(stories_dir), "--template", "alpaca"], capsys)
    assert "length histogram:" in out.out and "longer than seq_len 512" in out.out


def test_stats_command_category_mix_and_errors(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "b", "category": c} for c in ("qa", "qa", "summary")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad\n")
    code, out = run_cli(["data", "stats", str(path)], capsys)
    assert code == 2 and out.err.startswith(f"error: 1 of 4 records are invalid (first: {path}:4: invalid JSON")
    assert "records: 4 (3 valid, format alpaca)" in out.out and "invalid record: invalid JSON: 1" in out.out
    assert "  qa: 2" in out.out and "  summary: 1" in out.out
    code, out = run_cli(["data", "stats", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and out.err.startswith("error: ") and "does not exist" in out.err
