"""`jaxtune curate …` wiring: arguments reach the stages, outputs load back, reports and rejects are
written, and user errors exit 2 with a message. Model-backed commands get a scripted generator here; the real
model runs in test_curate_e2e.py."""

from __future__ import annotations

import json

import pytest

from jaxtune.curate import generator
from jaxtune.data.formats import load_records


def run(argv: list[str]) -> int:
    from jaxtune.cli.main import main

    return main(argv)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"instruction": "Name a planet.", "input": "", "output": "Mars"},
    {"instruction": "Name a planet.", "input": "", "output": "mars"},  # exact duplicate after normalising
    {"instruction": "Explain rain.", "input": "", "output": "As an AI language model, rain is water."},
    {"instruction": "Name a color.", "input": "", "output": "Blue"},
    {"instruction": "Broken record."},  # the reader rejects it: no output
]


def test_filter_command(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    out, report, rejects = tmp_path / "out.jsonl", tmp_path / "report.json", tmp_path / "rejects.jsonl"
    assert run(["curate", "filter", str(src), str(out), "--dedup", "exact", "minhash",
                "--report", str(report), "--rejects", str(rejects)]) == 0
    convs, _ = load_records(out)
    assert [c.messages[-1]["content"] for c in convs] == ["Mars", "Blue"]
    (summary,) = json.loads(report.read_text())
    assert summary["records_in"] == 4 and summary["records_out"] == 2
    assert [s["check"] for s in summary["steps"]][-2:] == ["exact duplicate", "near duplicate (MinHash)"]
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert sorted(x["check"] for x in lines) == ["exact duplicate", "refusal/boilerplate"]
    err = capsys.readouterr().err
    assert "missing field" in err and "wrote 2 records" in err  # the reader's skip is reported too
    unreadable = tmp_path / "out.jsonl.unreadable.jsonl"  # ... and the skipped record is saved, not lost
    assert f"rejected records in {unreadable}" in err
    assert [json.loads(x)["record"] for x in unreadable.read_text().splitlines()] == [ROWS[4]]


def test_filter_command_errors(tmp_path, capsys):
    assert run(["curate", "filter", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")]) == 2  # bad input
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS[2:3])
    assert run(["curate", "filter", str(src), str(tmp_path / "o.jsonl")]) == 1  # ran, nothing to write
    assert "no records left to write" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    with pytest.raises(SystemExit):
        run(["curate", "filter", str(src), str(tmp_path / "o.jsonl"), "--dedup", "fuzzy"])


class _Scripted:
    def __init__(self):
        self.kwargs = None

    def load(self, model_dir, **kwargs):
        self.kwargs = dict(kwargs, model_dir=model_dir)
        return self

    def __call__(self, prompts, max_new_tokens, seed):
        out = []
        for p in prompts:
            if p.startswith("Come up with a series of tasks"):
                out.append(" Write a limerick about a cat.\n")
            elif p.startswith("Can the following task"):
                out.append(" No")
            elif p.startswith("Below is an instruction"):
                out.append("Mars is a planet.")
            else:
                out.append("Output: There once was a cat from Peru.\n")
        return out


def test_self_instruct_command(tmp_path, monkeypatch, assets_dir):
    lm = _Scripted()
    monkeypatch.setattr(generator, "load_generate_fn", lm.load)
    out = tmp_path / "si.jsonl"
    assert run(["curate", "self-instruct", "--model", "MODEL", "--seeds",
                str(assets_dir / "data" / "self_instruct_seed_tasks.jsonl"), "--out", str(out), "--num", "1",
                "--temperature", "1.0", "--batch-size", "4"]) == 0
    assert lm.kwargs == {"model_dir": "MODEL", "chat": False, "temperature": 1.0, "top_p": 0.9, "batch_size": 4}
    convs, _ = load_records(out)
    assert [(c.messages[0]["content"], c.messages[1]["content"]) for c in convs] == [
        ("Write a limerick about a cat.", "There once was a cat from Peru.")]


def test_sdft_command(tmp_path, monkeypatch):
    lm = _Scripted()
    monkeypatch.setattr(generator, "load_generate_fn", lm.load)
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    out = tmp_path / "sdft.json"
    assert run(["curate", "sdft", "--model", "M", "--data", str(src), "--out", str(out)]) == 0
    assert lm.kwargs["chat"] is None  # auto: the chat template when the tokenizer has one
    assert json.loads(out.read_text()) == [
        {"instruction": "Name a planet.", "input": "", "output": "Mars is a planet."}]


SCORED_ROWS = [
    {"instruction": "Tell me a story about a cat.", "input": "", "task_type": "story",
     "output": "Once upon a time, there was a little cat named Tom. He liked to play in the sun."},
    {"instruction": "Tell me a story about a dog.", "input": "", "task_type": "story",
     "output": "Once upon a time, there was a big dog. The dog was happy and ran in the park."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris.", "task_type": "qa"},
    {"instruction": "Write a short poem about the sea and the wind at night.", "input": "", "task_type": "poem",
     "output": "The sea is dark, the wind is cold."},
]


def test_filter_command_scores_decontaminates_and_caps(tmp_path, capsys, stories_dir):
    src = _write_jsonl(tmp_path / "in.jsonl", SCORED_ROWS)
    refs = _write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": SCORED_ROWS[3]["instruction"]}])
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert run(["curate", "filter", str(src), str(out), "--score-model", str(stories_dir), "--template", "chatml",
                "--max-ifd", "5", "--max-ppl", "1e9", "--cap-per-type", "1", "--decontam", str(refs),
                "--report", str(report)]) == 0
    (summary,) = json.loads(report.read_text())
    steps = {s["check"]: s["in"] - s["out"] for s in summary["steps"]}
    assert steps["contaminated: overlaps heldout split"] == 1
    assert steps["IFD >= 5"] == 0 and steps["perplexity > 1e+09"] == 0
    assert steps["over cap for task type 'story'"] == 1
    assert summary["records_out"] == 2 and summary["notes"]["kept per task type"] == {"story": 1, "qa": 1}
    assert summary["notes"]["IFD"]["n"] == 3 and summary["notes"]["overlap with heldout"]["max"] == 1.0
    convs, _ = load_records(out)
    assert [c.meta["task_type"] for c in convs] == ["story", "qa"]  # the label is written back
    err = capsys.readouterr().err
    assert "IFD: n 3, mean" in err and "perplexity: n 3" in err and "overlap with heldout: records 1" in err


def test_filter_command_cap_by_verb(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", SCORED_ROWS)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert run(["curate", "filter", str(src), str(out), "--cap-per-type", "1", "--cap-by", "verb",
                "--report", str(report)]) == 0
    (summary,) = json.loads(report.read_text())
    assert summary["notes"]["kept per verb"] == {"tell": 1, "what": 1, "write": 1}
    assert [s["check"] for s in summary["steps"] if s["in"] != s["out"]] == ["over cap for verb 'tell'"]


def test_filter_command_score_and_decontam_errors(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", SCORED_ROWS)
    assert run(["curate", "filter", str(src), str(tmp_path / "o.jsonl"), "--max-ifd", "1.0"]) == 2
    assert "need a scoring model (pass --score-model MODEL_DIR)" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "?"}])
    assert run(["curate", "filter", str(src), str(tmp_path / "o.jsonl"), "--decontam", str(bad)]) == 2
    assert "bad.jsonl:1: no prompt or instruction" in capsys.readouterr().err
    assert run(["curate", "filter", str(src), str(tmp_path / "o.jsonl"), "--decontam-threshold", "0",
                "--decontam", str(src)]) == 2
    assert "decontam_threshold=0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["curate", "filter", str(src), str(tmp_path / "o.jsonl"), "--cap-by", "topic"])
