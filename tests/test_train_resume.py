"""`jaxtune train --resume` is safe and exact: a changed recipe is refused (naming the keys) unless the key may
change or `--allow-changes` is given, metrics.jsonl and TensorBoard hold every step once, the NaN guard stops
with the last good checkpoint named, and a run killed again and again ends bit-identical to an unbroken one."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxtune.cli.main import main
from jaxtune.faults import EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def _write_recipe(path: Path, stories_dir, data, run_dir, **sections) -> Path:
    raw = {
        "model": {"path": str(stories_dir), "attention_impl": "xla"},
        "data": {"train": str(data), "chat_template": "alpaca", "seq_len": 128, "cache_dir": None},
        "lora": {"rank": 2, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1},
        "output": {"run_dir": str(run_dir), "tensorboard": False, "progress": False},
        "mesh": {"data": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def stopped_run(stories_dir, short_alpaca, tmp_path_factory):
    """A 4-step run stopped after step 3 whose step-3 checkpoint never landed, as a kill after step 3 leaves it:
    metrics.jsonl and TensorBoard hold steps 1-3, the latest checkpoint is step 2."""
    root = tmp_path_factory.mktemp("stopped")
    recipe = _write_recipe(root / "recipe.yaml", stories_dir, short_alpaca, root / "run",
                           output={"tensorboard": True})
    assert main(["train", str(recipe), "--stop-after", "3"]) == 0
    shutil.rmtree(root / "run" / "checkpoints" / "3")
    return recipe, root / "run"


def _copy(stopped_run, tmp_path) -> tuple[str, Path, list[str]]:
    recipe, run = stopped_run
    shutil.copytree(run, tmp_path / "run")
    return str(recipe), tmp_path / "run", ["--set", f"output.run_dir={tmp_path / 'run'}"]


def test_changed_lr_and_seed_are_refused_with_the_keys(stopped_run, tmp_path, capsys):
    recipe, run, where = _copy(stopped_run, tmp_path)
    saved = (run / "config.yaml").read_text()
    rc = main(["train", recipe, "--resume", *where, "--set", "optim.lr=0.001", "--set", "train.seed=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "optim.lr: 0.003 -> 0.001" in err and "train.seed: 0 -> 1" in err and "--allow-changes" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == saved  # the run's recipe is left as it was


def test_changed_lora_rank_is_refused_before_loading(stopped_run, tmp_path, capsys):
    recipe, _, where = _copy(stopped_run, tmp_path)
    rc = main(["train", recipe, "--resume", *where, "--set", "lora.rank=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "lora.rank: 2 -> 8" in err
    assert "Traceback" not in err and "Event loop is closed" not in err and "shape" not in err.lower()


def test_allow_changes_cannot_reshape_the_weights(stopped_run, tmp_path):
    recipe, _, where = _copy(stopped_run, tmp_path)
    p = _cli(Path(recipe), "--resume", "--allow-changes", *where, "--set", "lora.rank=8")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert "lora_A: stored (2, " in err[0] and "cannot change on resume" in err[0]


def test_allow_changes_keeps_both_recipes(stopped_run, tmp_path, capsys):
    recipe, run, where = _copy(stopped_run, tmp_path)
    assert main(["train", recipe, "--resume", "--allow-changes", *where, "--set", "optim.lr=0.001"]) == 0
    assert yaml.safe_load((run / "config.2.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.001
    assert "optim.lr: 0.003 -> 0.001" in capsys.readouterr().out  # said, not silent


def test_allowed_changes_pass_and_are_reported(stopped_run, tmp_path, capsys):
    recipe, run, where = _copy(stopped_run, tmp_path)
    assert main(["train", recipe, "--resume", *where, "--set", "train.log_every=2", "--set", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "train.steps: 4 -> 5" in out and "done: step 5/5" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 5
    assert yaml.safe_load((run / "config.2.yaml").read_text())["train"]["steps"] == 4


def test_resume_writes_every_step_once(stopped_run, tmp_path):
    recipe, run, where = _copy(stopped_run, tmp_path)
    assert main(["train", recipe, "--resume", *where]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    steps = [s for s in _tensorboard_scalars(run / "tensorboard") if s[0] == "train/loss"]
    assert sorted(x[1] for x in steps) == [1, 2, 3, 4]


def _tensorboard_scalars(logdir: Path) -> list[tuple[str, int]]:
    """(tag, step) of each scalar TensorBoard would show: events are read in file order and a
    `SessionLog.START` at step P hides the earlier events at steps >= P (TensorBoard's purge rule)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    seen: list[tuple[str, int]] = []
    for f in sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = f.read_bytes()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            ev = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                seen = [s for s in seen if s[1] < ev.step]
            for v in ev.summary.value:
                seen.append((v.tag, ev.step))
    return seen


def test_nan_stop_names_the_step_and_last_good_checkpoint(stories_dir, short_alpaca, tmp_path, monkeypatch, capsys):
    from jaxtune.train import loop

    to_micro, calls = loop.to_micro, {"n": 0}

    def corrupt_third(batch, k):
        calls["n"] += 1
        out = to_micro(batch, k)
        return dict(out, targets=np.full_like(out["targets"], 10_000)) if calls["n"] == 3 else out

    monkeypatch.setattr(loop, "to_micro", corrupt_third)
    recipe = _write_recipe(tmp_path / "r.yaml", stories_dir, short_alpaca, tmp_path / "run",
                           train={"nan_policy": "stop"})
    assert main(["train", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "stopped at step 3" in err and "checkpoint step 2 is the last good one" in err
    assert str(tmp_path / "run") in err


def test_disk_full_during_save_keeps_the_previous_checkpoint(stories_dir, short_alpaca, tmp_path, monkeypatch, capsys):
    import errno

    from jaxtune.train.checkpoint import Checkpointer

    real = ocp.CheckpointManager.save

    def full_at_4(self, step, *args, **kw):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_4)
    recipe = _write_recipe(tmp_path / "r.yaml", stories_dir, short_alpaca, tmp_path / "run")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert str(tmp_path / "run") in err[0] and "last good checkpoint is step 2" in err[0]
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]


# --- killed again and again ------------------------------------------------------------------------------


def _saved(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / str(step) / "trainable")
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for k in sorted(node):
            if isinstance(node[k], dict):
                walk(node[k], f"{prefix}/{k}")
            else:
                flat[f"{prefix}/{k}"] = np.asarray(node[k])

    walk(tree, "")
    return flat


def _cli(recipe: Path, *args: str, fault: str | None = None, step: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")  # a kill keeps the log
    env.pop("JAXTUNE_FAULT", None)
    if fault:
        env.update(JAXTUNE_FAULT=fault, JAXTUNE_FAULT_STEP=str(step))
    return subprocess.run([sys.executable, "-m", "jaxtune.cli", "train", str(recipe), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _resumed_from(stdout: str) -> int:
    if "no checkpoint in" in stdout:
        return 0
    (line,) = [x for x in stdout.splitlines() if x.startswith("resumed from checkpoint step")]
    return int(line.split()[4])


def test_killed_five_times_ends_bit_identical(stories_dir, short_alpaca, tmp_path):
    steps = 8
    unbroken = _write_recipe(tmp_path / "a.yaml", stories_dir, short_alpaca, tmp_path / "a", train={"steps": steps})
    assert main(["train", str(unbroken)]) == 0
    recipe = _write_recipe(tmp_path / "b.yaml", stories_dir, short_alpaca, tmp_path / "b", train={"steps": steps})
    # Kills after a step run with synchronous saves, so the checkpoint before them is surely committed; kills
    # inside a save run with async saves, whose write is then cut short.
    sync = ["--set", "train.async_checkpoint=false"]
    kills = [("train.after_step", 3, sync), ("checkpoint.mid_save", 4, []), ("train.after_step", 5, sync),
             ("checkpoint.mid_save", 6, []), ("train.after_step", 7, sync)]
    committed, partial = 0, None  # the last checkpoint surely committed; one a kill left half-written
    for i, (fault, step, args) in enumerate(kills):
        p = _cli(recipe, *(["--resume"] if i else []), *args, fault=fault, step=step)
        assert p.returncode == EXIT_CODE, p.stderr[-2000:]
        assert f"fault injected at {fault!r}" in p.stderr
        if i:
            resumed = _resumed_from(p.stdout)
            assert resumed >= committed and resumed != partial, (resumed, committed, partial)
        partial = step if (tmp_path / "b" / "checkpoints" / f"{step}.orbax-checkpoint-tmp").exists() else None
        committed = step - 1 if args else committed
    p = _cli(recipe, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _resumed_from(p.stdout) == committed
    assert f"done: step {steps}/{steps}" in p.stdout

    a, b = _saved(tmp_path / "a", steps), _saved(tmp_path / "b", steps)
    assert a.keys() == b.keys() and a
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, steps + 1))
    whole = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]


def test_qlora_resume_ends_bit_identical(stories_dir, short_alpaca, tmp_path):
    """Checkpoints hold the adapter and optimizer only: a resumed QLoRA run re-quantizes the base at load, which
    must give the very base it trained against (the model's down_proj input, 172, makes NF4 blocks cross rows)."""
    qlora = {"quantize": "nf4", "quantize_scope": "all-linear"}
    whole = _write_recipe(tmp_path / "a.yaml", stories_dir, short_alpaca, tmp_path / "a", lora=qlora)
    assert main(["train", str(whole)]) == 0
    recipe = _write_recipe(tmp_path / "b.yaml", stories_dir, short_alpaca, tmp_path / "b", lora=qlora)
    assert main(["train", str(recipe), "--stop-after", "2"]) == 0
    assert main(["train", str(recipe), "--resume"]) == 0
    a, b = _saved(tmp_path / "a", 4), _saved(tmp_path / "b", 4)
    assert a.keys() == b.keys() and a
    for name in a:
        assert np.array_equal(a[name], b[name]), name
