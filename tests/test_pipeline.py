"""`jaxtune pipeline` end to end on the real stories260K model, shrunk: every stage keeps records, a second
run skips every stage, --from and a code change re-run what they should, a kill mid-stage resumes to
byte-identical outputs, and the HTML report renders offline in a real browser."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.faults import EXIT_CODE
from jaxtune.pipeline import manifest
from jaxtune.pipeline.config import load_pipeline
from jaxtune.pipeline.context import Context, round_dir
from jaxtune.pipeline.run import parse_from, plan, run_pipeline, run_stage

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pipeline-tiny.yaml"
# Small enough for the suite; max_new_tokens stays at the recipe's 300 so stories can end (with BOS).
SHRINK = ["generate.tasks=16", "generate.samples=2", "tune.train.steps=6", "tune.train.forgetting_every=3",
          "tune.train.log_every=3", "tune.optim.warmup_steps=2", "domain.eval_limit=16", "output.progress=false", "evaluate.n_boot=200",
          "tune.forgetting.n_samples=4", "tune.forgetting.max_windows=2", "tune.forgetting.general_chars=4000",
          "tune.forgetting.probe_tokens=8", "evaluate.latency_prompts=4", "evaluate.latency_repeats=1",
          "evaluate.latency_batch_size=2", "evaluate.hallucination_max_new_tokens=16", "evaluate.hallucination_limit=12",
          "rounds=1"]


def _cfg(stories_dir, run_dir, *extra):
    return load_pipeline(RECIPE, [f"model.path={stories_dir}", f"output.run_dir={run_dir}", *SHRINK, *extra])


def _outputs(run_dir: Path) -> dict:
    """Every stage's output hashes (logs aside), by stage."""
    return {f"{k}/{s}": manifest.tree_hashes(round_dir(run_dir, k) / s, manifest.LOG_NAMES) for k, s in plan(1)}


@pytest.fixture(scope="module")
def first_run(stories_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = _cfg(stories_dir, run_dir)
    lines = []
    runs = run_pipeline(cfg, log=lines.append)
    return cfg, run_dir, runs, lines


def test_every_stage_runs_and_keeps_records(first_run):
    _, run_dir, runs, lines = first_run
    assert [(r.round, r.stage) for r in runs] == plan(1)
    assert not any(r.skipped for r in runs)
    for r in runs:
        assert r.counts["out"] > 0, (r.round, r.stage, r.counts)
        man = manifest.read_manifest(round_dir(run_dir, r.round) / r.stage)
        assert man["counts"] == r.counts and man["code"]["sources_sha256"]
        assert set(man["inputs"]) and man["model"]["files"]
    gen = runs[2].counts
    assert gen["in"] == 16 and sum(gen["dropped"].values()) == gen["in"] - gen["out"]
    assert all(reason.startswith(("failed ", "unfinished", "prompt too long")) for reason in gen["dropped"])
    rejects = [json.loads(x) for x in (round_dir(run_dir, 1) / "generate" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == gen["in"] - gen["out"] and all(r["key"] and r["reason"] for r in rejects)
    # The training data is the base model's own verified stories, ended by BOS in the data.
    data = [json.loads(x) for x in (round_dir(run_dir, 1) / "tune" / "train.jsonl").read_text().splitlines()]
    assert data and all(r["output"] and r["instruction_id_list"] for r in data)
    # The held-out task type never reaches generation or training.
    generated = [json.loads(x) for x in (round_dir(run_dir, 1) / "generate" / "tasks.jsonl").read_text().splitlines()]
    assert {r["task_type"] for r in data} and "lesson" not in {r["task_type"] for r in data + generated}
    assert (round_dir(run_dir, 1) / "tune" / "merged" / "model.safetensors").is_file()
    assert (round_dir(run_dir, 1) / "tune" / "adapter" / "adapter_model.safetensors").is_file()
    assert any(line.startswith("[pipeline] round 1 generate: 16 in") for line in lines)


def test_report_has_rounds_with_intervals(first_run, html_checker):
    _, run_dir, _, _ = first_run
    doc = json.loads((round_dir(run_dir, 1) / "report" / "report.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    for r in doc["rounds"]:
        for key in ("prompt_all_followed", "format_adherence", "ignored_constraint_rate", "instruction_followed"):
            e = r["report"][key]
            assert e["n"] > 0 and e["lo"] <= e["value"] <= e["hi"], (key, e)
        assert r["report"]["overreach"]["refusal"]["n"] == doc["n_report_prompts"]
        assert "startend:end_checker" in r["report"]["unasked_format"]
    assert doc["rounds"][1]["vs_base"]["prompt_all_followed"]["method"] == "paired bootstrap"
    gen = doc["rounds"][1]["report"]["generalization"]
    assert gen["unseen_task_types"] == ["lesson"] and gen["seen"]["n"] > 0 and gen["unseen"]["n"] > 0
    for name in ("grounded", "closedbook"):
        h = doc["rounds"][1]["hallucination"][name]["hallucination"]
        assert h["tuned"]["n"] == 12 and h["difference"]["method"] == "paired bootstrap"
    timing = json.loads((round_dir(run_dir, 1) / "report" / "timing.json").read_text())["timing"]
    assert set(timing["inference"]["1"]["models"]) == {"base", "tuned"}
    assert timing["inference"]["1"]["setup"]["prompts"] == 4
    assert timing["data"]["1"]["device_seconds"] > 0 and timing["data"]["1"]["total"] > 0
    assert "timing" not in doc  # report.json stays free of wall times
    rise = doc["rounds"][1]["forgetting"]["base_ppl_rise"]
    assert rise["n"] > 0 and rise["lo"] <= rise["value"] <= rise["hi"]
    # The report split never reaches generation: no report prompt is a generated task.
    report_prompts = {json.loads(x)["prompt"] for x in
                      (round_dir(run_dir, 0) / "evaluate" / "report.jsonl").read_text().splitlines()}
    generated = {json.loads(x)["prompt"] for x in
                 (round_dir(run_dir, 1) / "generate" / "tasks.jsonl").read_text().splitlines()}
    assert not report_prompts & generated
    html = (round_dir(run_dir, 1) / "report" / "report.html").read_text()
    assert "95%" in html and "pts" in html and "relative change" not in html
    for section in ("Hallucination", "Generalization", "Inference cost", "Data cost"):
        assert f"<h2>{section}" in html
    page = html_checker(round_dir(run_dir, 1) / "report" / "report.html")
    assert page.problems() == [] and page.n_images == 2


def test_second_run_skips_every_stage(first_run):
    cfg, run_dir, _, _ = first_run
    before = _outputs(run_dir)
    lines = []
    runs = run_pipeline(cfg, log=lines.append)
    assert all(r.skipped for r in runs), [(r.round, r.stage) for r in runs if not r.skipped]
    assert _outputs(run_dir) == before
    assert sum("up to date, skipped" in line for line in lines) == len(plan(1))


def test_from_reruns_that_stage_and_what_follows(first_run):
    cfg, run_dir, _, _ = first_run
    before = _outputs(run_dir)
    runs = run_pipeline(cfg, from_stage="1/evaluate", log=lambda _: None)
    ran = [(r.round, r.stage) for r in runs if not r.skipped]
    assert ran == [(1, "evaluate"), (1, "report")]
    assert _outputs(run_dir) == before  # deterministic: the same bytes again
    assert parse_from("filter", 2) == (1, "filter") and parse_from("round-2/tune", 2) == (2, "tune")
    for bad in ("nope", "3/filter", "0/filter", "x/filter"):
        with pytest.raises(ValueError, match="--from"):
            parse_from(bad, 2)


def test_code_change_reruns_a_stage(first_run, monkeypatch):
    cfg, run_dir, _, _ = first_run
    ctx = Context(cfg, run_dir, log=lambda _: None)
    assert run_stage(ctx, 0, "report", force=False).skipped
    changed = {**manifest.code_identity(), "sources_sha256": "0" * 64}
    monkeypatch.setattr(manifest, "code_identity", lambda: changed)
    assert not run_stage(ctx, 0, "report", force=False).skipped
    assert manifest.read_manifest(round_dir(run_dir, 0) / "report")["code"]["sources_sha256"] == "0" * 64


def test_refuses_a_run_dir_it_did_not_write(stories_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a jaxtune pipeline run"):
        run_pipeline(_cfg(stories_dir, tmp_path), log=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_kill_mid_stage_then_resume_is_byte_identical(first_run, stories_dir, tmp_path):
    """Round 0 is copied from the first run (and is skipped as up to date); the process is killed at a fault
    point inside round 1's generate stage, after its first batch of samples; re-running resumes there."""
    _, run_a, _, _ = first_run
    run_b = tmp_path / "run"
    run_b.mkdir()
    shutil.copytree(round_dir(run_a, 0), round_dir(run_b, 0))
    shutil.copy(run_a / "pipeline.json", run_b / "pipeline.json")
    cmd = [sys.executable, "-m", "jaxtune.cli.main", "pipeline", str(RECIPE), "--set", f"model.path={stories_dir}",
           "--set", f"output.run_dir={run_b}", *[a for s in SHRINK for a in ("--set", s)]]
    env = {**os.environ, "JAXTUNE_FAULT": "pipeline.generate.progress"}
    killed = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == EXIT_CODE, killed.stderr[-2000:]
    assert "round 0 evaluate: up to date" in killed.stdout
    assert not (round_dir(run_b, 1) / "generate").exists()  # nothing half-written under the stage's name
    assert [p.name for p in round_dir(run_b, 1).iterdir()] == [next(round_dir(run_b, 1).glob(".generate.tmp-*")).name]
    resumed = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "round 1 generate: 16 in" in resumed.stdout
    assert sorted(p.name for p in round_dir(run_b, 1).iterdir()) == sorted(
        ["generate", "filter", "distill", "tune", "evaluate", "report"])
    a, b = _outputs(run_a), _outputs(run_b)
    assert {k: sorted(f for f in a[k] if a[k][f] != b[k].get(f)) for k in a if a[k] != b[k]} == {}
    assert b == a
