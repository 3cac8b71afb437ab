"""Checkpoints and exports at a URL (`gs://…`) go through `etils.epath`, never `pathlib` (which reads
`gs://b/x` as `gs:/b/x`). No network: `epath.testing.mock_epath` routes every URL to the local filesystem
(`gs://bucket/x` lands in `./gs:/bucket/x`) while recording the calls, and orbax's one GCS-only query (does the
bucket use a hierarchical namespace) is answered here. Array reads and writes go through tensorstore's own GCS
driver, which has no such mock: the test of a full resume from a separate checkpoint dir is
test_preemption.py's."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import pytest
from etils.epath import testing as epath_testing

from jaxtune import files
from jaxtune.files import MARKER, atomic_dir
from jaxtune.recipe import ConfigError, load_recipe
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.resume import saved_recipe


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://bucket/…` as `tmp_path/gs:/bucket/…`; yields the list of `(call, path, mode)` epath made."""
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    calls = []

    def record(name):
        def fn(orig, path, *args, **kw):
            calls.append((name, str(path), args[0] if name == "open" else None))
            return orig(path, *args, **kw)

        return fn

    names = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove", "rmtree")
    with epath_testing.mock_epath(**{n: record(n) for n in names}):
        yield calls


def _local(url: str):
    from pathlib import Path

    return Path(url.replace("gs://", "gs:/"))


def _marker(url: str) -> dict:
    return json.loads((_local(url) / MARKER).read_text())


def _writes(calls) -> list[str]:
    return [path for name, path, mode in calls if name == "open" and "w" in mode]


def _export(url: str, contents: dict[str, str], **kw):
    with atomic_dir(url, kind="merged", **kw) as tmp:
        for name, text in contents.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


# --- exports --------------------------------------------------------------------------------------------


def test_url_export_is_uploaded_file_by_file_with_the_marker_last(bucket, tmp_path):
    _export("gs://bucket/m", {"a.txt": "A", "sub/b.txt": "B"})
    assert _writes(bucket) == ["gs://bucket/m/" + MARKER, "gs://bucket/m/a.txt", "gs://bucket/m/sub/b.txt",
                               "gs://bucket/m/" + MARKER]
    assert (_local("gs://bucket/m") / "sub" / "b.txt").read_text() == "B"
    marker = _marker("gs://bucket/m")
    assert marker["complete"] is True and marker["files"] == ["a.txt", "sub"]
    assert sorted(os.listdir(_local("gs://bucket"))) == ["m"]  # no temp dir beside it: staged locally


def test_url_export_never_deletes_what_jaxtune_did_not_write(bucket):
    _local("gs://bucket/m").mkdir(parents=True)
    (_local("gs://bucket/m") / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"no jaxtune export wrote \(notes.md\).*--force"):
        _export("gs://bucket/m", {"a.txt": "A"})
    assert os.listdir(_local("gs://bucket/m")) == ["notes.md"]

    _export("gs://bucket/m", {"a.txt": "A", "old.txt": "O"}, force=True)
    _export("gs://bucket/m", {"a.txt": "A2"}, force=True)  # old.txt was jaxtune's: removed; notes.md stays
    assert sorted(os.listdir(_local("gs://bucket/m"))) == sorted([MARKER, "a.txt", "notes.md"])
    assert (_local("gs://bucket/m") / "notes.md").read_text() == "mine"
    assert ("rmtree", "gs://bucket/m/notes.md", None) not in bucket


def test_an_upload_cut_short_is_marked_and_replaced_by_the_next_export(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

    def fail_on_b(orig, path, mode, *a, **kw):
        if str(path).endswith("b.txt"):
            raise OSError(28, "No space left on device")
        return orig(path, mode, *a, **kw)

    with epath_testing.mock_epath(open=fail_on_b), pytest.raises(OSError, match="No space left"):
        _export("gs://bucket/m", {"a.txt": "A", "b.txt": "B"})
    marker = _marker("gs://bucket/m")
    assert marker["complete"] is False and marker["files"] == ["a.txt", "b.txt"]
    with epath_testing.mock_epath():
        _export("gs://bucket/m", {"c.txt": "C"})  # no --force needed: every entry is listed as jaxtune's
    assert sorted(os.listdir(_local("gs://bucket/m"))) == sorted([MARKER, "c.txt"])
    assert _marker("gs://bucket/m")["complete"] is True


def test_url_targets_refuse_run_dirs_and_protected_urls(bucket):
    (_local("gs://bucket/run") / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="is a run directory"):
        _export("gs://bucket/run", {"a.txt": "A"}, force=True)
    with pytest.raises(ValueError, match="contains the adapter directory"):
        _export("gs://bucket", {"a.txt": "A"}, protect={"the adapter directory": "gs://bucket/adapter"})
    assert files.check_target("gs://bucket/new") is False


def test_a_missing_filesystem_package_is_one_error_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_gcsfs(orig, path, *a, **kw):
        raise ImportError("Please install gcsfs to access Google Storage")

    with epath_testing.mock_epath(exists=no_gcsfs, isdir=no_gcsfs, listdir=no_gcsfs, glob=no_gcsfs):
        with pytest.raises(OSError, match="gs://bucket/m: Please install gcsfs.*pip install gcsfs"):
            _export("gs://bucket/m", {"a.txt": "A"})
        with pytest.raises(OSError, match="gs://bucket/ckpt: Please install gcsfs.*pip install gcsfs"):
            Checkpointer("gs://bucket/ckpt")


def test_save_merged_and_the_adapter_to_a_url_match_a_local_export(bucket, stories_dir, tmp_path):
    from flax import nnx

    from jaxtune.export import save_merged
    from jaxtune.hf.load import load_pretrained
    from jaxtune.lora.apply import apply_lora
    from jaxtune.lora.config import LoraConfig
    from jaxtune.lora.peft import save_peft_adapter

    model = load_pretrained(stories_dir, jnp.float32)
    apply_lora(model, LoraConfig(rank=2), nnx.Rngs(0))
    for save, name in ((save_merged, "merged"), (save_peft_adapter, "adapter")):
        out = save(model, f"gs://bucket/{name}") if name == "adapter" else save(model, None, f"gs://bucket/{name}")
        assert str(out) == f"gs://bucket/{name}"
        local = save(model, tmp_path / name) if name == "adapter" else save(model, None, tmp_path / name)
        written = sorted(p.name for p in local.iterdir() if p.name != MARKER)
        assert [p.rsplit("/", 1)[1] for p in _writes(bucket) if p.startswith(str(out) + "/")] == \
            [MARKER, *written, MARKER]
        for n in written:
            assert (_local(str(out)) / n).read_bytes() == (local / n).read_bytes(), n


# --- checkpoints ----------------------------------------------------------------------------------------


def test_a_url_checkpoint_dir_is_read_through_epath_with_gcs_commit_rules(bucket, tmp_path):
    local = Checkpointer(tmp_path / "ckpt", async_save=False)
    local.save(3, {"w": jnp.ones(2)}, {"m": jnp.zeros(2)}, {"step": 3, "config": {"train": {"steps": 9}}})
    local.close()
    shutil.copytree(tmp_path / "ckpt", _local("gs://bucket/run/ckpt"))
    (_local("gs://bucket/run/ckpt") / "5").mkdir()  # a step whose upload never finished: no commit_success.txt

    ckpt = Checkpointer("gs://bucket/run/ckpt")
    try:
        assert str(ckpt.directory) == "gs://bucket/run/ckpt"
        assert ckpt.latest_step() == 3 and ckpt._committed() == 3
    finally:
        ckpt.close()
    # resume reads the recipe from the checkpoint alone: the run dir went with the VM
    assert saved_recipe("gs://bucket/run/ckpt", tmp_path / "gone") == (3, {"train": {"steps": 9}})
    assert not (tmp_path / "gone").exists()
    assert ("open", "gs://bucket/run/ckpt/3/meta/metadata", "r") in bucket


def test_recipe_keeps_a_url_checkpoint_dir_and_refuses_a_url_run_dir(tmp_path, stories_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {stories_dir}\ndata:\n  train: d.json\noutput:\n  run_dir: runs/x\n")
    cfg = load_recipe(recipe, ["output.checkpoint_dir=gs://bucket/x/ckpt", "output.export_dir=gs://bucket/x/out"])
    assert cfg.output.checkpoints == "gs://bucket/x/ckpt" and cfg.output.exports == "gs://bucket/x/out"
    assert load_recipe(recipe).output.checkpoints == os.path.join("runs", "x", "checkpoints")
    with pytest.raises(ConfigError, match="output.run_dir: 'gs://b/run' is a URL.*output.checkpoint_dir"):
        load_recipe(recipe, ["output.run_dir=gs://b/run"])
