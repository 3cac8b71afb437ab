"""The training run end to end on the real stories260K model: exact resume, the NaN guard, the forgetting
check's warning and early stop, and the files a run leaves behind; and the steps each hook runs after."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import types
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune.recipe import RecipeConfig
from jaxtune.structs import from_dict
from jaxtune.train import loop
from jaxtune.train.hooks import TrainState, make_hooks
from jaxtune.train.loop import TrainingStopped, train


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Runs of one recipe compile the same programs: share them through JAX's persistent cache."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def small_data(assets_dir, tmp_path_factory):
    records = json.loads((assets_dir / "data" / "alpaca_data_1k.json").read_text())[:40]
    path = tmp_path_factory.mktemp("data") / "alpaca_40.json"
    path.write_text(json.dumps(records))
    return path


def _recipe(stories_dir, data, run_dir, **sections) -> RecipeConfig:
    raw = {
        "model": {"path": str(stories_dir), "attention_impl": "xla"},
        # seq_len 128 keeps steps cheap; the Alpaca prompt fills it in 31 of these 40 records.
        "data": {"train": str(data), "chat_template": "alpaca", "seq_len": 128, "val_fraction": 0.1,
                 "cache_dir": None, "max_dropped_fraction": 0.8},
        "lora": {"rank": 4, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 4, "save_every": 3, "log_every": 3},
        "output": {"run_dir": str(run_dir), "tensorboard": False, "progress": False},
        "mesh": {"data": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return from_dict(RecipeConfig, raw)


def _saved(run_dir, step) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no target tree: orbax notes it reads the sharding from the file
        tree = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "trainable")
    flat = []

    def walk(node):
        for k in sorted(node):
            walk(node[k]) if isinstance(node[k], dict) else flat.append(np.asarray(node[k]))

    walk(tree)
    return flat


class FakeMonitor:
    """Stands in for eval.forgetting.ForgettingMonitor (tested there): records when the loop calls it."""

    calls: list = []
    frozen: list = []  # gc.get_freeze_count() inside the loop
    recorded_baseline = True

    def __init__(self, tokenizer, cfg, *, run_dir=None, mesh=None):
        self.cfg = cfg
        self.dir = None if run_dir is None else Path(run_dir) / "forgetting"

    def recorded(self):
        return FakeMonitor.recorded_baseline and (self.dir is None or (self.dir / "baseline.json").is_file())

    def baseline(self, model):
        FakeMonitor.calls.append(("baseline", None))
        return {"forgetting/probe": 1.0}

    def measure(self, model, step):
        FakeMonitor.calls.append(("measure", step))
        FakeMonitor.frozen.append(gc.get_freeze_count())
        return {"forgetting/probe": 0.5}


SCRIPTED_RISES = {2: 0.05, 4: 0.2, 6: 0.6, 8: 0.9}


class ScriptedMonitor(FakeMonitor):
    """A monitor whose base perplexity rises by `SCRIPTED_RISES[step]`: the thresholds' effect on the loop."""

    def measure(self, model, step):
        rise = SCRIPTED_RISES[step]
        return {"forgetting/base_ppl": 4.0 * (1 + rise), "forgetting/base_ppl_rel": rise,
                "forgetting/probe_agreement": 0.5, "forgetting/probe_agreement_rel": -0.5}


@pytest.fixture(scope="module")
def whole_run(stories_dir, small_data, tmp_path_factory):
    """Six steps in one go, with TensorBoard, evals and the forgetting hook on."""
    from jaxtune.eval import forgetting

    run_dir = tmp_path_factory.mktemp("whole")
    cfg = _recipe(stories_dir, small_data, run_dir, train={"eval_every": 3, "forgetting_every": 2},
                  output={"tensorboard": True}, forgetting={"n_samples": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(forgetting, "ForgettingMonitor", FakeMonitor)
        FakeMonitor.calls, FakeMonitor.frozen = [], []
        result = train(cfg)
        calls = list(FakeMonitor.calls)
    return cfg, result, calls


def test_resume_is_bit_identical(whole_run, tmp_path):
    # Dropout on, several epochs of shuffled packed data, and the break falls mid-epoch.
    whole_cfg, whole, _ = whole_run
    assert whole.step == 6 and whole.compiles == 1
    split = tmp_path / "split"
    cfg = dataclasses.replace(whole_cfg, output=dataclasses.replace(whole_cfg.output, run_dir=str(split)))
    # The recorded forgetting baseline (FakeMonitor writes none): each checkpoint carries it.
    baseline = {"baseline.json": '{"base": {"probe": 1.0}}\n', "base_probe_outputs.jsonl": '{"id": "p1"}\n'}
    (split / "forgetting").mkdir(parents=True)
    for name, text in baseline.items():
        (split / "forgetting" / name).write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        from jaxtune.eval import forgetting

        mp.setattr(forgetting, "ForgettingMonitor", FakeMonitor)
        first = train(cfg, stop_after=3)
        assert first.step == 3
        with pytest.raises(ValueError, match="already holds checkpoints"):
            train(cfg)
        # A resume that cannot get the baseline back would measure it on the trained model: refused.
        mp.setattr(FakeMonitor, "recorded_baseline", False)
        with pytest.raises(ValueError, match="forgetting baseline .* is missing"):
            train(cfg, resume=True)
        mp.setattr(FakeMonitor, "recorded_baseline", True)
        shutil.rmtree(split / "forgetting")  # the run dir lost it (a new VM): the checkpoint brings it back
        second = train(cfg, resume=True)
    assert {p.name: p.read_text() for p in (split / "forgetting").iterdir()} == baseline
    assert second.step == 6
    assert first.losses + second.losses == whole.losses
    for a, b in zip(_saved(whole.run_dir, 6), _saved(tmp_path / "split", 6)):
        assert np.array_equal(a, b)
    assert whole.eval_loss == second.eval_loss


def test_nan_guard_skips_then_stops_without_overwriting(stories_dir, small_data, tmp_path, monkeypatch):
    to_micro = loop.to_micro
    calls = {"n": 0}

    def corrupt_some(batch, k):  # step 2 bad alone, then steps 4 and 5 in a row
        calls["n"] += 1
        out = to_micro(batch, k)
        if calls["n"] in (2, 4, 5):
            out = dict(out, targets=np.full_like(out["targets"], 10_000))  # past the vocab: NaN loss
        return out

    monkeypatch.setattr(loop, "to_micro", corrupt_some)
    cfg = _recipe(stories_dir, small_data, tmp_path / "run", train={"nan_policy": "skip", "max_bad_steps": 2})
    with pytest.raises(TrainingStopped, match="stopped at step 5 after 2 non-finite step"):
        train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]
    from jaxtune.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [3]  # the last good one, untouched

    calls["n"] = 0
    strict = _recipe(stories_dir, small_data, tmp_path / "strict", train={"nan_policy": "stop"})
    with pytest.raises(TrainingStopped, match="stopped at step 2 after 1 non-finite"):
        train(strict)
    assert gc.get_freeze_count() == 0  # unfrozen when the loop raises too


def test_run_dir_holds_metrics_tensorboard_config_and_provenance(whole_run):
    _, result, calls = whole_run
    run = result.run_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "loss_tokens"} <= set(train_rows[0])
    assert train_rows[0]["lr"] == 0.0 and train_rows[1]["lr"] == pytest.approx(3e-3)  # one warmup step
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
    assert calls == [("baseline", None), ("measure", 2), ("measure", 4), ("measure", 6)]
    # The loop runs with the setup's objects frozen out of the GC (loop.gc_frozen), and unfreezes them after.
    assert min(FakeMonitor.frozen) > 10_000 and gc.get_freeze_count() == 0
    assert [r["step"] for r in rows if r["split"] == "forgetting"] == [0, 2, 4, 6]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").read_text().startswith("model:")
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["data_hash"] and prov["tokenizer_hash"] and prov["versions"]["jax"]
    data = json.loads((run / "data_report.json").read_text())
    assert data["records_in"] == 40 and data["dropped"] == {"prompt fills seq_len": 31} and data["truncated"] == 9
    assert result.eval_loss == [r for r in rows if r["split"] == "eval"][-1]["loss"]


def test_forgetting_warns_then_stops_cleanly(stories_dir, small_data, tmp_path, capsys):
    # Checks at 2 (+5%: quiet), 4 (+20%: warn, go on) and 6 (+60%: stop); steps 7 and 8 never run.
    from jaxtune.eval import forgetting

    cfg = _recipe(stories_dir, small_data, tmp_path / "run", train={"steps": 8, "save_every": 5, "forgetting_every": 2},
                  forgetting={"warn_at": 0.1, "stop_at": 0.5}, output={"export": True})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(forgetting, "ForgettingMonitor", ScriptedMonitor)
        result = train(cfg)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("forgetting @")]
    assert lines == [
        "forgetting @ step 2: base ppl 4.20 (+5.0%)  probe agreement 50%",
        ("forgetting @ step 4: base ppl 4.80 (+20.0%)  probe agreement 50% — WARNING: base perplexity rose 20.0% ≥ "
         "warn_at 10%"),
        ("forgetting @ step 6: base ppl 6.40 (+60.0%)  probe agreement 50% — STOP: base perplexity rose 60.0% ≥ "
         "stop_at 50%")]
    assert "stopped early at step 6/8: base perplexity rose 60.0% ≥ forgetting.stop_at 50%" in out
    assert result.step == 6 and len(result.losses) == 6 and result.total_steps == 8
    assert result.stopped.startswith("base perplexity rose 60.0% ≥ forgetting.stop_at 50%")
    assert result.eval_loss is not None  # the stopping step is evaluated like a last one
    from jaxtune.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [5, 6]
    assert result.export_dir and (result.export_dir / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "forgetting"] == [0, 2, 4, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [5, 6]  # keep_best evaluates each save
    assert max(r["step"] for r in rows) == 6


def test_real_forgetting_check_stops_through_the_cli(stories_dir, small_data, tmp_path, capsys):
    """A tiny stop_at with a high learning rate: the real monitor's first check stops the run, and the command
    still exits 0 (a stop is a decision, not a failure)."""
    from jaxtune.cli.main import main
    from jaxtune.recipe import dump_recipe

    cfg = _recipe(stories_dir, small_data, tmp_path / "run", optim={"lr": 3e-2},
                  train={"steps": 6, "forgetting_every": 2, "save_every": 0},
                  forgetting={"n_samples": 2, "sample_tokens": 16, "seq_len": 32, "batch_size": 2,
                              "max_windows": 2, "probe_tokens": 4, "general_chars": 2000, "stop_at": 1e-9})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(cfg))
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "forgetting @ step 2: base ppl" in out and "— STOP: " in out and "stopped early at step 2/6" in out
    from jaxtune.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    check = [r for r in rows if r["split"] == "forgetting" and r["step"] == 2]
    assert check and max(check[0]["forgetting/base_ppl_rel"], check[0].get("forgetting/general_ppl_rel", 0)) > 0


@pytest.mark.parametrize("keep_best, end", [(1, 5), (0, 5), (1, 7)])
def test_hooks_fire_at_their_intervals_in_order(keep_best, end):
    # save_every 3 and log_every 2 on a 7-step schedule; `end` 5 is a --stop-after invocation.
    cfg = from_dict(RecipeConfig, {"model": {"path": "m"}, "data": {"train": "d.json"}, "output": {"run_dir": "r"},
                                   "train": {"steps": 7, "save_every": 3, "log_every": 2, "keep_best": keep_best}})
    run = types.SimpleNamespace(cfg=cfg, end=end, total_steps=7, eval_batches=[{}])
    hooks = make_hooks(run, TrainState(0, None, None, None))
    fired = {s: [h.name for h in hooks if h.due(TrainState(s, None, None, None))] for s in range(1, end + 1)}
    saved = ["eval", "checkpoint"] if keep_best else ["checkpoint"]  # keep_best ranks each save by eval loss
    expect = {1: ["metrics"], 2: ["metrics", "log"], 3: ["metrics"] + saved, 4: ["metrics", "log"],
              5: ["metrics", "log"] + saved}
    if end == 7:
        expect.update({5: ["metrics"], 6: ["metrics", "log"] + saved, 7: ["metrics", "log", "eval", "checkpoint"]})
    assert fired == expect
    # A step a hook stopped the run at is evaluated and checkpointed like the last one.
    assert [h.name for h in hooks if h.due(TrainState(4, None, None, None, stopped="why"))] == [
        "metrics", "log", "eval", "checkpoint"]
