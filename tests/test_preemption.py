"""A preempted run: SIGTERM becomes a flag read between steps (`hooks.PreemptionNotice`), agreed across
processes; `jaxtune train` then commits a checkpoint of the step reached, says so in one line and exits 75, and
`--resume` from that checkpoint dir alone (the run dir gone with its VM) ends bit-identical to an unbroken run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxtune.cli.main import main
from jaxtune.cli.train import PREEMPTED
from jaxtune.train import hooks
from jaxtune.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
STEPS = 8

# `jaxtune train` with each step slowed to 0.3 s (a stand-in for a real model's step), so the signal lands
# mid-run; everything else is the command as installed.
SLOW_TRAIN = """
import sys, time
from jaxtune.runtime import apply_cpu_defaults
apply_cpu_defaults()
from jaxtune.train import loop
real = loop.run_step
def slow(run, state):
    real(run, state)
    time.sleep(0.3)
loop.run_step = slow
from jaxtune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def compile_cache():
    """The three runs compile the same programs: the later ones (the subprocess too) read them from JAX's
    persistent cache, which the suite points at a throwaway directory (conftest.py)."""
    keys = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k in keys:
        jax.config.update(k, 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _recipe(path: Path, stories_dir, data, run_dir, ckpt_dir, export: bool = True) -> Path:
    raw = {
        "model": {"path": str(stories_dir), "attention_impl": "xla"},
        "data": {"train": str(data), "chat_template": "alpaca", "seq_len": 128, "cache_dir": None},
        "lora": {"rank": 2, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": STEPS, "batch_size": 4, "log_every": 1},
        "output": {"run_dir": str(run_dir), "checkpoint_dir": str(ckpt_dir), "export": export,
                   "tensorboard": False, "progress": False},
        "mesh": {"data": 1},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def _trainable(ckpt_dir: Path, step: int) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(ckpt_dir / str(step) / "trainable")
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for k in sorted(node):
            walk(node[k], f"{prefix}/{k}") if isinstance(node[k], dict) else flat.setdefault(f"{prefix}/{k}",
                                                                                             np.asarray(node[k]))

    walk(tree, "")
    return flat


def test_sigterm_checkpoints_exits_75_and_resumes_bit_identical(stories_dir, short_alpaca, tmp_path, capsys):
    unbroken = _recipe(tmp_path / "a.yaml", stories_dir, short_alpaca, tmp_path / "a", tmp_path / "a-ckpt", export=False)
    assert main(["train", str(unbroken)]) == 0
    capsys.readouterr()

    run, ckpt = tmp_path / "vm" / "run", tmp_path / "bucket" / "ckpt"  # ckpt: where gs://… would be
    recipe = _recipe(tmp_path / "b.yaml", stories_dir, short_alpaca, run, ckpt)
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAXTUNE_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, "train", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len([r for r in _rows(run) if r["split"] == "train"]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED, err[-3000:]
    assert time.monotonic() - sent < 8  # about 3 s on 2 busy cores: the step in flight, the save, the exit
    reached = [r["step"] for r in _rows(run) if r["split"] == "train"]
    k = reached[-1]
    assert 2 <= k < STEPS and reached == list(range(1, k + 1))
    (line,) = [x for x in out.splitlines() if x.startswith("preempted:")]
    assert f"at step {k}/{STEPS}" in line and f"checkpoint step {k} is in {ckpt}" in line
    assert line.endswith(f"jaxtune train {recipe} --resume")
    assert Checkpointer(ckpt).all_steps() == [k]  # committed (no save_every: the notice's save alone)
    assert not (run / "export").exists()  # a preempted run is unfinished: nothing exported
    first_rows = _rows(run)

    shutil.rmtree(tmp_path / "vm")  # the VM is gone; the checkpoint dir is all that is left
    assert main(["train", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from checkpoint step {k} in {ckpt}" in out and f"done: step {STEPS}/{STEPS}" in out
    a, b = _trainable(tmp_path / "a-ckpt", STEPS), _trainable(ckpt, STEPS)
    assert a.keys() == b.keys() and a
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    whole = [r["loss"] for r in _rows(tmp_path / "a") if r["split"] == "train"]
    resumed = [r["loss"] for r in _rows(run) if r["split"] == "train"]
    assert [r["loss"] for r in first_rows if r["split"] == "train"] + resumed == whole
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()


def test_sigterm_in_the_last_step_defers_the_export_to_the_resume(stories_dir, short_alpaca, tmp_path, monkeypatch):
    from jaxtune.recipe import load_recipe
    from jaxtune.train import loop

    real = loop.run_step

    def notice_in_last(run, state):
        real(run, state)
        if state.step == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "run_step", notice_in_last)
    cfg = load_recipe(_recipe(tmp_path / "r.yaml", stories_dir, short_alpaca, tmp_path / "run", tmp_path / "ckpt"))
    before = signal.getsignal(signal.SIGTERM)
    result = loop.train(cfg, handle_sigterm=True)
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.preempted and result.step == STEPS and result.export_dir is None
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [STEPS] and not (tmp_path / "run" / "export").exists()
    again = loop.train(cfg, resume=True, handle_sigterm=True)  # nothing left to train: only the export
    assert not again.preempted and again.losses == [] and again.export_dir is not None
    assert (tmp_path / "run" / "export" / "merged" / "model.safetensors").is_file()


# --- the notice -----------------------------------------------------------------------------------------


def test_notice_is_a_flag_read_between_steps_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with hooks.PreemptionNotice() as notice:
        assert signal.getsignal(signal.SIGTERM) == notice._flag
        assert not notice.agreed(3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert notice.agreed(3)
    assert signal.getsignal(signal.SIGTERM) is before
    with hooks.PreemptionNotice(enabled=False) as off:  # a library call without handle_sigterm
        assert signal.getsignal(signal.SIGTERM) is before and not off.agreed(1)


def test_notice_is_not_installed_outside_the_main_thread():
    before, seen = signal.getsignal(signal.SIGTERM), []

    def enter():
        with hooks.PreemptionNotice():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert seen == [before]


def test_one_process_never_talks_to_the_others(monkeypatch):
    from jax.experimental import multihost_utils

    def no(*a, **k):
        raise AssertionError("a collective on one process")

    monkeypatch.setattr(multihost_utils, "process_allgather", no)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no)
    with hooks.PreemptionNotice() as notice:
        assert not notice.agreed(1)


@pytest.mark.parametrize("processes", [2, 1])  # 1: a single TPU VM, where jax.distributed runs too
def test_processes_agree_through_jax_preemption_service(monkeypatch, processes):
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step) or step == 5)
    before = signal.getsignal(signal.SIGTERM)
    with hooks.PreemptionNotice() as notice:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's service owns SIGTERM: not replaced
        assert [notice.agreed(s) for s in (3, 4, 5)] == [False, False, True]
    assert asked == [3, 4, 5]


def test_processes_any_reduce_their_flags_without_the_service(monkeypatch):
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    jax.config.update("jax_enable_preemption_service", False)
    try:
        other = {"flag": False}  # the other process's flag
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda x: np.stack([np.asarray(x), np.asarray([other["flag"]])]))
        with hooks.PreemptionNotice() as notice:
            assert signal.getsignal(signal.SIGTERM) == notice._flag
            assert not notice.agreed(1)
            other["flag"] = True  # SIGTERM reached the other host only: this one stops at the same step
            assert notice.agreed(2) and not notice.received
    finally:
        jax.config.update("jax_enable_preemption_service", True)
