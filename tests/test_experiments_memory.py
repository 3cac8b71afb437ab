"""experiments/memory.py in quick mode: the tiny Llama compiled for LoRA, QLoRA and full fine-tuning on
XLA:CPU gives rows of the documented schema, LoRA trains a fraction of what full fine-tuning trains, NF4
stores fewer weight bytes, and a second call reads every row from the cache instead of compiling."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import memory  # noqa: E402

FIELDS = {"model", "method", "method_desc", "recipe", "overrides", "target", "backend", "device", "devices", "mesh",
          "seq_len", "batch", "grad_accum", "remat", "attention", "base_params", "total_params", "trainable_params",
          "trainable_pct", "weights_bytes", "grads_bytes", "optimizer_bytes", "wgo_bytes", "wgo_gib",
          "arguments_gib", "temporaries_gib", "peak_gib", "peak_bytes", "device_memory_gib", "fits",
          "does_not_fit", "peak_vs_full", "compile_s", "label", "note", "key", "cached", "jaxtune_version"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    return out, memory.rows(quick=True, out=out)


def test_quick_rows_schema_and_figures(quick):
    _, rows = quick
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["lora", "qlora", "full"]
    for r in rows:
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert all(not isinstance(v, (dict, list)) for v in r.values()), r  # flat, for the docs driver
        assert (r["target"], r["backend"], r["seq_len"], r["batch"], r["remat"]) == ("cpu", "XLA:CPU", 128, 1, "full")
        assert r["peak_bytes"] > 0 and r["does_not_fit"] is None and r["fits"] is None
        assert r["label"] == memory.LABEL and not r["cached"]
        assert r["wgo_bytes"] == r["weights_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
    assert by["full"]["trainable_pct"] == 100.0 and by["full"]["peak_vs_full"] == 1.0
    assert 0 < by["lora"]["trainable_pct"] < 100.0
    assert by["lora"]["trainable_params"] == by["qlora"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["qlora"]["weights_bytes"] < by["lora"]["weights_bytes"]
    assert by["lora"]["peak_vs_full"] == pytest.approx(by["lora"]["peak_bytes"] / by["full"]["peak_bytes"], abs=1e-4)
    assert "| tiny-llama | QLoRA r16" in memory.markdown(rows)


def test_second_call_reads_the_cache(quick):
    out, first = quick
    files = sorted((out / "cache").glob("*.json"))
    assert len(files) == 4 and sum(f.name.startswith("row-") for f in files) == 3  # + one analytic report
    stamps = [f.stat().st_mtime_ns for f in files]
    start = time.perf_counter()
    again = memory.rows(quick=True, out=out)
    assert time.perf_counter() - start < 2  # no subprocess, no compile
    assert all(r["cached"] for r in again)
    assert [{**r, "cached": None} for r in again] == [{**r, "cached": None} for r in first]
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_main_writes_memory_json(quick, capsys):
    out, first = quick
    assert memory.main(["--quick", "--out", str(out)]) == 0
    saved = json.loads((out / "memory.json").read_text())
    assert [r["key"] for r in saved] == [r["key"] for r in first] and all(r["cached"] for r in saved)
    assert "| model | method |" in capsys.readouterr().out


def test_cache_key_follows_recipe_overrides_and_target():
    jobs = memory.jobs(quick=False)
    keys = {j["key"] for j in jobs}
    assert len(keys) == len(jobs) == 12
    assert {(j["model"], j["target"]) for j in jobs} == {("Llama-3-8B", "cpu"), ("Llama-3-8B", "v5e:1x1"),
                                                         ("Llama-3-70B", "cpu"), ("Llama-3-70B", "v5p:2x4x4")}
