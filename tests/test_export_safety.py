"""Export never deletes what jaxtune did not write: user files, the current directory, the source model, the
adapter and run directories are refused; a previous jaxtune export is replaced atomically (old or new under
the name at every instant, also when killed at each step of the swap, and the next export cleans up); a
full disk keeps the previous export."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune import files, load_pretrained
from jaxtune.export import save_merged
from jaxtune.faults import EXIT_CODE
from jaxtune.hf import save as hf_save
from jaxtune.lora.apply import apply_lora
from jaxtune.lora.config import LoraConfig
from jaxtune.lora.peft import save_peft_adapter

MARKER = ".jaxtune-export.json"


@pytest.fixture(scope="module")
def model_dir(hf_zoo):
    return hf_zoo("llama_gqa")[0]


@pytest.fixture(scope="module")
def model(model_dir):
    return apply_lora(load_pretrained(model_dir), LoraConfig(rank=2, alpha=4.0, target_modules=["q_proj"]))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def _cli(argv):
    from jaxtune.cli.main import main

    return main(argv)


# ------------------------------------------------------------------------------------------- what is refused


def test_user_files_in_target_are_kept(model, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    with pytest.raises(ValueError, match=r"not a jaxtune export.*notes\.txt.*--force"):
        save_merged(model, None, out, source_dir=model_dir)
    assert snapshot(out) == {"notes.txt": b"mine", "data": None}
    assert siblings(out) == ["out"]


def test_reexport_replaces_a_previous_export_and_only_that(model, model_dir, tmp_path):
    out = save_merged(model, None, tmp_path / "out", source_dir=model_dir)
    marker = json.loads((out / MARKER).read_text())
    assert marker["jaxtune_export"] == "merged" and "config.json" in marker["files"]
    save_merged(model, None, out, source_dir=model_dir)
    assert siblings(out) == ["out"] and (out / "config.json").is_file()
    (out / "notes.txt").write_text("added by the user")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        save_merged(model, None, out, source_dir=model_dir)
    assert (out / "notes.txt").read_text() == "added by the user"


def test_force_replaces_a_non_jaxtune_dir(model, model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "old.bin").write_text("x")
    save_merged(model, None, out, source_dir=model_dir, force=True)
    assert not (out / "sub").exists() and (out / MARKER).is_file()
    assert siblings(out) == ["out"]


def _run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    return run


@pytest.mark.parametrize("case", ["cwd", "model-parent", "source", "run", "run-parent"])
def test_protected_targets_are_refused_even_with_force(model, model_dir, tmp_path, monkeypatch, case):
    src = tmp_path / "models" / "base"
    shutil.copytree(model_dir, src)
    run = _run_dir(tmp_path / "runs")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {"cwd": Path("."), "model-parent": src.parent, "source": src, "run": run, "run-parent": run.parent}[case]
    match = {"cwd": "current directory", "model-parent": "source model", "source": "source model",
             "run": "run directory", "run-parent": "run directory"}[case]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        save_merged(model, None, out, source_dir=src, force=True)
    assert snapshot(tmp_path) == before


def test_cli_refuses_the_adapter_dir_and_forces_only_when_asked(model, model_dir, tmp_path, capsys):
    adapter = save_peft_adapter(model, tmp_path / "ad" / "adapter")
    before = snapshot(tmp_path)
    for out in (adapter, adapter.parent):
        code = _cli(["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--force"])
        assert code == 2 and "adapter directory" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    argv = ["export", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(target)]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err and "--force" in err and "Traceback" not in err
    assert _cli([*argv, "--force"]) == 0
    assert not (target / "notes.txt").exists() and (target / "config.json").is_file()


def test_read_only_target_is_refused(model, model_dir, tmp_path):
    out = save_merged(model, None, tmp_path / "out", source_dir=model_dir)
    before = snapshot(out)
    out.chmod(0o555)
    try:
        for force in (False, True):
            with pytest.raises(ValueError, match="read-only"):
                save_merged(model, None, out, source_dir=model_dir, force=force)
        assert snapshot(out) == before and siblings(out) == ["out"]
    finally:
        out.chmod(0o755)


def test_peft_adapter_target_is_guarded_too(model, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        save_peft_adapter(model, out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    save_peft_adapter(model, out)
    save_peft_adapter(model, out)  # over its own previous export
    assert json.loads((out / MARKER).read_text())["jaxtune_export"] == "peft-adapter"


# ------------------------------------------------------------------------------------------- disk full


def test_disk_full_keeps_the_previous_export(model, model_dir, tmp_path, monkeypatch):
    out = save_merged(model, None, tmp_path / "out", source_dir=model_dir, max_shard_size="100KB")
    before = snapshot(out)
    real, calls = hf_save.write_safetensors, []

    def full(file, ts, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            file.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, ts, metadata)

    monkeypatch.setattr(hf_save, "write_safetensors", full)
    with pytest.raises(OSError, match="disk full.*previous export.*intact") as err:
        save_merged(model, None, out, source_dir=model_dir, max_shard_size="100KB")
    assert err.value.errno == errno.ENOSPC
    assert snapshot(out) == before and siblings(out) == ["out"]


# ------------------------------------------------------------------------------------------- killed mid-swap

# Writes one export of a file `w.txt` holding argv[2] with only jaxtune.files imported (no jax: fast).
WRITER = """
import sys
from jaxtune import files
from jaxtune.faults import fault_point
if sys.argv[3] == "fallback":
    files._exchange = lambda a, b: False
with files.atomic_dir(sys.argv[1], kind="test") as tmp:
    (tmp / "w.txt").write_text(sys.argv[2][:2])
    fault_point("test.writing")
    (tmp / "w.txt").write_text(sys.argv[2])
"""


def _write(out: Path, text: str, mode: str = "exchange", fault: str | None = None):
    env = {**os.environ, "JAXTUNE_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-c", WRITER, str(out), text, mode], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("mode,fault", [
    ("exchange", "test.writing"), ("exchange", "export.before_swap"), ("exchange", "export.after_swap"),
    ("fallback", "export.before_swap"), ("fallback", "export.between_renames"), ("fallback", "export.after_swap"),
])
def test_killed_at_each_step_leaves_old_or_new_and_next_export_recovers(tmp_path, mode, fault):
    out = tmp_path / "out"
    assert _write(out, "old").returncode == 0
    killed = _write(out, "new", mode, fault)
    assert killed.returncode == EXIT_CODE, killed.stderr
    if fault != "export.between_renames":  # the two-rename fallback has one gap; the next export closes it
        assert (out / "w.txt").read_text() in ("old", "new")
    assert len(siblings(out)) > 1  # something was left behind to recover
    done = _write(out, "third", mode)
    assert done.returncode == 0, done.stderr
    assert (out / "w.txt").read_text() == "third" and siblings(out) == ["out"]


def test_fallback_gap_is_finished_by_the_next_export(tmp_path):
    out = tmp_path / "out"
    assert _write(out, "old").returncode == 0
    assert _write(out, "new", "fallback", "export.between_renames").returncode == EXIT_CODE
    assert not out.exists()
    files.recover(out)
    assert (out / "w.txt").read_text() == "new" and siblings(out) == ["out"]


def test_killed_cli_export_recovers(model, model_dir, tmp_path):
    out = save_merged(model, None, tmp_path / "out", source_dir=model_dir)
    env = {**os.environ, "JAXTUNE_FAULT": "export.after_swap"}
    killed = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "export", "--model", str(model_dir),
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == EXIT_CODE, killed.stderr
    assert (out / "config.json").is_file() and len(siblings(out)) == 2
    save_merged(model, None, out, source_dir=model_dir)
    assert siblings(out) == ["out"]


def test_only_jaxtune_stale_temp_dirs_are_removed(tmp_path):
    out = tmp_path / "out"
    ours, theirs, busy = tmp_path / ".out.tmp-0123abcd", tmp_path / ".out.tmp-89abcdef", tmp_path / ".out.tmp-fedcba98"
    for d in (ours, theirs, busy):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    for d in (ours, busy):
        (d / MARKER).write_text(json.dumps({"jaxtune_export": "merged", "complete": False}))
    with files.dir_lock(busy), files.atomic_dir(out, kind="test") as tmp:  # busy: a live export writing there
        (tmp / "w.txt").write_text("x")
    assert siblings(out) == sorted([".out.tmp-89abcdef", ".out.tmp-fedcba98", "out"])
