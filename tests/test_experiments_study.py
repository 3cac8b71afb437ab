"""The study behind docs/results.md: its quick grid end to end (two seeds per arm), and the committed page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import analysis  # noqa: E402
import study  # noqa: E402

FIGURE_KEYS = {"id", "claim", "metric", "arm", "value", "lo", "hi", "n", "method", "runs"}


def check_schema(doc: dict) -> None:
    assert doc["schema"] == analysis.SCHEMA
    for key in ("grid", "data", "claims", "runs", "levels", "figures", "checks"):
        assert key in doc, key
    for f in doc["figures"]:
        assert FIGURE_KEYS <= set(f), f["id"]
        assert f["runs"] and all(r in doc["runs"] for r in f["runs"]), f["id"]
        if f["value"] is not None:
            assert f["lo"] <= f["value"] + 1e-12 and f["value"] <= f["hi"] + 1e-12, f["id"]
            assert f["n"] > 0
    for arm, metrics in doc["levels"].items():
        assert all(fid in {f["id"] for f in doc["figures"]} for fid in metrics.values()), arm
    for claim in ("1", "2", "3", "5"):
        assert claim in doc["claims"]["summary"], claim


@pytest.fixture(scope="module")
def quick(tmp_path_factory, stories_dir):
    """The quick grid as a user runs it: its own process, without the suite's eight fake devices."""
    out = tmp_path_factory.mktemp("study")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "study.py"), "--quick", "--out", str(out),
                           "--jobs", "0", "--skip-memory", "--model", str(stories_dir)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    print(f"quick study: {time.perf_counter() - started:.0f} s")
    return out


def test_quick_study_schema_and_checks(quick):
    doc = json.loads((quick / "results.json").read_text())
    check_schema(doc)
    assert doc["quick"] is True
    # Two seeds give different numbers; the same seed again gives the same bytes.
    assert all(doc["checks"]["seeds_differ"].values()), doc["checks"]["seeds_differ"]
    assert doc["checks"]["rerun"]["identical"] is True
    assert doc["checks"]["prediction"]["satisfied"]["new_value"] is not None
    # Every figure traces to a run dir whose result.json hashes as recorded.
    assert analysis.trace(quick / "results.json", quick) == []
    md = (quick / "results.md").read_text()
    for section in ("Claim 1", "Claim 3", "claims 2 and 5", "Reproducibility", "Runs"):
        assert section in md
    for png in (quick / "results").glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(list((quick / "results").glob("*.png"))) >= 3


def test_trace_catches_an_edited_run(quick, tmp_path):
    doc = json.loads((quick / "results.json").read_text())
    name, run = next((k, v) for k, v in doc["runs"].items() if k != "base")
    result = quick / "runs" / run["dir"] / "result.json"
    original = result.read_bytes()
    try:
        result.write_bytes(original.replace(b'"seconds"', b'"Seconds"', 1))
        assert any(name in p for p in analysis.trace(quick / "results.json", quick))
    finally:
        result.write_bytes(original)


def test_second_run_is_cached(quick, stories_dir, capsys):
    assert study.main(["--quick", "--out", str(quick), "--jobs", "0", "--skip-memory", "--model", str(stories_dir),
                       "--results", str(quick / "again")]) == 0
    printed = capsys.readouterr().out
    assert "up to date" in printed and "done in" not in printed


def test_committed_results_page():
    """docs/results.md is rendered from docs/results.json (the full grid), and both are complete."""
    results = ROOT / "docs" / "results.json"
    doc = json.loads(results.read_text())
    check_schema(doc)
    assert doc["quick"] is False
    assert doc["checks"]["rerun"]["identical"] is True
    plots = {k: f"results/{v}" for k, v in analysis.plot_names(doc).items()}
    md = analysis.render(doc, plots, analysis.read_commentary(ROOT / "experiments" / "commentary.md"))
    assert (ROOT / "docs" / "results.md").read_text() == md + "\n"
    for target in plots.values():
        assert (ROOT / "docs" / target).is_file(), target
    for claim in ("1", "2+5", "3", "4"):
        assert claim in doc["claims"], claim
    assert doc.get("memory"), "the real-shape memory rows are missing"
