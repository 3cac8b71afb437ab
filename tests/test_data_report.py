"""The data report: every record that does not reach training counted by reason, truncation counted with the
tokens it cost, the recipe ceilings that refuse a run losing too much, and `jaxtune data stats` naming bad
records and exiting 2."""

import json

import pytest
from transformers import AutoTokenizer

from jaxtune.cli.main import main
from jaxtune.data.chat import builtin_template
from jaxtune.data.config import DataConfig
from jaxtune.data.formats import load_records
from jaxtune.data.prepare import check_ceilings, prepare_dataset
from jaxtune.data.report import Report
from jaxtune.data.tokenize import tokenize_conversation

SEQ_LEN = 160  # the Alpaca preamble alone is ~100 stories260K tokens


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture
def crafted(tmp_path):
    """Six lines: two fit, one response is cut, one prompt fills seq_len, one empty response, one bad JSON."""
    rows = [
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Count to three.", "output": "One two three."},
        {"instruction": "Tell a story.", "output": "Once upon a time " * 20},
        {"instruction": "Repeat this. " * 20, "output": "No."},
        {"instruction": "Answer nothing.", "output": ""},
    ]
    path = tmp_path / "crafted.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + ["{not json"]) + "\n")
    return path


def _cfg(path, tmp_path, **kw):
    return DataConfig(train=str(path), chat_template="alpaca", seq_len=SEQ_LEN, cache_dir=None,
                      rejects_path=str(tmp_path / "rejects.jsonl"), **kw)


def test_counts_every_loss_by_reason_and_truncation_tokens(tok, crafted, tmp_path):
    train, _, report = prepare_dataset(_cfg(crafted, tmp_path, on_error="skip"), tok)
    assert len(train) == 3
    assert report.lost() == {"invalid record: empty assistant turn": 1, "invalid record: invalid JSON": 1,
                             "prompt fills seq_len": 1}
    assert report.dropped_fraction() == pytest.approx(3 / 6)
    story, _ = load_records(crafted, on_error="skip")
    ids, mask = tokenize_conversation(story[2], tok, builtin_template("alpaca"))
    assert report.truncated == 1 and report.truncated_fraction() == pytest.approx(1 / 4)
    assert report.truncated_tokens == ids.size - (SEQ_LEN + 1)
    assert report.truncated_targets == int(mask[SEQ_LEN + 1:].sum()) > 0
    summary = report.summary()
    assert "dropped or skipped: 3 of 6 (50.0%)" in summary and "prompt fills seq_len: 1" in summary
    assert f"{report.truncated_tokens} tokens cut" in summary
    assert f"rejected records in {tmp_path / 'rejects.jsonl'}" in summary
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_ceilings_refuse_with_reason_fraction_and_fix(tok, crafted, tmp_path):
    _, _, report = prepare_dataset(_cfg(crafted, tmp_path, on_error="skip"), tok)
    with pytest.raises(ValueError, match=r"3 of 6 records \(50\.0%\) dropped \(invalid record: empty assistant "
                       r"turn: 1, .*prompt fills seq_len: 1\), above data\.max_dropped_fraction 0\.05.*data\.seq_len"):
        check_ceilings(report, _cfg(crafted, tmp_path, on_error="skip"))
    check_ceilings(report, _cfg(crafted, tmp_path, on_error="skip", max_dropped_fraction=0.5))
    strict = _cfg(crafted, tmp_path, on_error="skip", max_dropped_fraction=1.0, max_truncated_fraction=0.2)
    with pytest.raises(ValueError, match=r"1 of 4 examples \(25\.0%\) truncated.*data\.max_truncated_fraction 0\.2"
                       r".*data\.overlong: drop"):
        check_ceilings(report, strict)


@pytest.mark.parametrize("kw", [{"max_dropped_fraction": 1.5}, {"max_dropped_fraction": None},
                                {"max_truncated_fraction": -0.1}, {"max_truncated_fraction": "0.1"}])
def test_ceilings_are_fractions(kw):
    with pytest.raises(ValueError, match=f"data.{next(iter(kw))} must be"):
        DataConfig(train="d.json", **kw)


def test_stats_names_bad_records_and_exits_2(tok, stories_dir, crafted, tmp_path, capsys):
    code = main(["data", "stats", str(crafted), "--tokenizer", str(stories_dir), "--template", "alpaca",
                 "--seq-len", str(SEQ_LEN)])
    out = capsys.readouterr()
    assert code == 2
    assert f"{crafted}:5: empty assistant turn" in out.out and f"{crafted}:6: invalid JSON" in out.out
    assert "prompt fills seq_len: 1" in out.out and "truncated: 1" in out.out
    assert "--rejects" in out.err and out.err.startswith("error: 2 of 6 records are invalid")
    rejects = tmp_path / "r.jsonl"
    assert main(["data", "stats", str(crafted), "--rejects", str(rejects)]) == 2
    assert len(rejects.read_text().splitlines()) == 2 and str(rejects) in capsys.readouterr().err


def test_eval_report_shows_the_run_data_report(tok, crafted, assets_dir, tmp_path):
    from jaxtune.eval import report as rp
    from jaxtune.eval.ifeval import load_ifeval_inputs, score_responses

    _, _, report = prepare_dataset(_cfg(crafted, tmp_path, on_error="skip"), tok)
    run = tmp_path / "run"
    run.mkdir()
    assert rp.read_data_report(run) is None
    (run / "data_report.json").write_text(json.dumps(report.to_dict()))
    inputs = load_ifeval_inputs(assets_dir / "data" / "ifeval_input_data.jsonl")[:2]
    scored = score_responses(inputs, ["ok", "ok"])
    doc = rp.build_report(base_ifeval=scored, tuned_ifeval=scored, models={}, settings={},
                          data_report=rp.read_data_report(run))
    assert doc["training"] == {"train": [], "eval": [], "data": report.to_dict()}
    page = rp.render_html(doc, figs={})
    assert "<h3>Data" in page and "prompt fills seq_len: 1" in page
    assert "dropped or skipped: 3 of 6 (50.0%)" in page


def test_quickstart_recipe_data_passes_its_own_ceilings(tok, assets_dir, monkeypatch):
    """The quickstart recipe's data really is within its ceilings: 40 of 1,000 prompts fill seq_len (4%)."""
    from pathlib import Path

    from jaxtune.recipe import load_recipe

    repo = Path(__file__).resolve().parents[1]
    data = load_recipe(repo / "configs" / "quickstart.yaml").data
    monkeypatch.chdir(repo)
    cfg = DataConfig(**{**vars(data), "train": str(assets_dir / "data" / "alpaca_data_1k.json"), "cache_dir": None})
    _, _, report = prepare_dataset(cfg, tok)
    assert report.lost() == {"prompt fills seq_len": 40} and report.truncated == 542
    check_ceilings(report, cfg)


def test_a_huge_record_is_counted_not_lost_silently(tok, tmp_path):
    """A multi-megabyte record (its prompt alone overflows seq_len many times) is one counted drop, shown in
    the summary; one with a multi-megabyte response is kept and counted as truncated with the tokens it lost."""
    rows = [{"instruction": "Say hi.", "output": "Hi."},
            {"instruction": "word " * 500_000, "output": "No."},
            {"instruction": "Tell a story.", "output": "word " * 500_000}]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert path.stat().st_size > 5_000_000
    train, _, report = prepare_dataset(_cfg(path, tmp_path, max_dropped_fraction=0.5), tok)
    assert len(train) == 2
    assert report.lost() == {"prompt fills seq_len": 1}
    assert report.truncated == 1 and report.truncated_tokens > 400_000
    assert "dropped: 1 (prompt fills seq_len: 1)" in report.summary()
