"""The Colab notebooks in notebooks/: committed without outputs and with a tagged parameter cell; the install and
push cells do what they promise (pins the runtime's jax, asks before uploading); and each notebook executes end
to end in a real kernel on the bundled tiny model, with its parameters injected papermill-style."""

import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "pipeline")
PLACEHOLDER = "git+https://github.com/<org>/jaxtune"
# configs/pipeline-tiny.yaml takes ~5 minutes for two rounds; one round of this takes well under a minute.
PIPELINE_SHRINK = [
    "generate.tasks=12", "generate.samples=2", "domain.eval_limit=12", "tune.train.steps=4",
    "tune.train.forgetting_every=0", "tune.train.log_every=2", "tune.optim.warmup_steps=1", "evaluate.n_boot=200",
    "evaluate.latency_prompts=0", "evaluate.grounded=null", "evaluate.closedbook=null", "tune.forgetting.n_samples=2",
    "tune.forgetting.max_windows=1", "tune.forgetting.general_chars=2000", "tune.forgetting.probe_tokens=8",
    "output.progress=false"]


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _cell(nb, needle: str) -> str:
    """The source of the one code cell containing `needle`."""
    hits = [c.source for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(hits) == 1, f"{len(hits)} code cells contain {needle!r}"
    return hits[0]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean_and_parameterized(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None and "execution" not in c.metadata for c in code), \
        "clear the outputs (and execution timings) before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell, and only it, is tagged 'parameters'"
    assert f'JAXTUNE_SOURCE = "{PLACEHOLDER}"' in tagged[0].source
    assert nb.metadata.kernelspec.name == "python3"


def test_notebooks_share_their_install_and_detect_cells():
    a, b = _read("quickstart"), _read("pipeline")
    for needle in ("JAXTUNE_NOTEBOOK_TEST", "jax.devices()"):
        assert _cell(a, needle) == _cell(b, needle)


def test_pipeline_recipe_is_pipeline_tiny():
    """The notebook's recipe, with its story-model settings, is configs/pipeline-tiny.yaml less the model, run
    directory and rounds (the parameter cell's)."""
    import ast

    import yaml

    from jaxtune.recipe import apply_overrides

    tree = ast.parse(_cell(_read("pipeline"), "RECIPE = "))
    value = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    story = ast.literal_eval(value["story"].body)
    ours = apply_overrides(yaml.safe_load(ast.literal_eval(value["RECIPE"])), story)
    tiny = yaml.safe_load((NOTEBOOKS.parent / "configs" / "pipeline-tiny.yaml").read_text())
    assert ours == {k: v for k, v in tiny.items() if k not in ("model", "output", "rounds")}


def _run_install(monkeypatch, tmp_path, source: str, test_env: str | None) -> list[list[str]]:
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(list(cmd)))
    monkeypatch.chdir(tmp_path)
    if test_env is None:
        monkeypatch.delenv("JAXTUNE_NOTEBOOK_TEST", raising=False)
    else:
        monkeypatch.setenv("JAXTUNE_NOTEBOOK_TEST", test_env)
    exec(_cell(_read("quickstart"), "JAXTUNE_NOTEBOOK_TEST"), {"JAXTUNE_SOURCE": source})  # noqa: S102 (the cell)
    return calls


def test_install_cell_pins_the_runtime_jax(monkeypatch, tmp_path):
    url = "git+https://github.com/example/jaxtune"
    assert _run_install(monkeypatch, tmp_path, url, "1") == []
    with pytest.raises(ValueError, match="placeholder"):
        _run_install(monkeypatch, tmp_path, PLACEHOLDER, None)
    [cmd] = _run_install(monkeypatch, tmp_path, url, None)
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and url in cmd
    assert cmd[cmd.index("-c") + 1] == "constraints.txt"
    pins = set((tmp_path / "constraints.txt").read_text().split())
    for dist in ("jax", "jaxlib", "torch"):
        assert f"{dist}=={importlib.metadata.version(dist)}" in pins
    assert not any(p.startswith(("flax", "transformers", "numpy")) for p in pins)


@pytest.mark.parametrize("platform, kind, cc, found, dtype", [
    ("tpu", "TPU v5 lite", None, "TPU", "bfloat16"), ("gpu", "Tesla T4", "7.5", "GPU", "float32"),
    ("gpu", "NVIDIA H100", "9.0", "GPU", "bfloat16"), ("gpu", "NVIDIA B200", "10.0", "GPU", "bfloat16"),
    ("cpu", "cpu", None, "CPU", "float32")])
def test_detect_cell_names_the_accelerator_and_picks_a_dtype(monkeypatch, capsys, platform, kind, cc, found, dtype):
    device = types.SimpleNamespace(platform=platform, device_kind=kind, **({"compute_capability": cc} if cc else {}))
    fake = types.SimpleNamespace(devices=lambda: [device], device_count=lambda: 1, __version__="0.0")
    monkeypatch.setitem(sys.modules, "jax", fake)  # also keeps apply_cpu_defaults from touching this process
    scope = {}
    exec(_cell(_read("pipeline"), "jax.devices()"), scope)  # noqa: S102 (the notebook's cell)
    assert (scope["ACCELERATOR"], scope["DTYPE"]) == (found, dtype)
    assert capsys.readouterr().out.startswith(f"found: {found} (1 x {kind})")


class _FakeApi:
    calls: ClassVar[list] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.mark.parametrize("push, repo, answer, uploads", [
    (False, "me/m", "yes", 0), (True, "me/m", "no", 0), (True, "me/m", "", 0), (True, "me/m", "yes", 2)])
def test_push_cell_uploads_only_when_asked_and_confirmed(monkeypatch, push, repo, answer, uploads):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "calls", [])
    asked = []
    scope = {"PUSH_TO_HUB": push, "HUB_REPO_ID": repo, "merged_dir": "run/export/merged",
             "adapter_dir": "run/export/adapter", "input": lambda q: asked.append(q) or answer}
    exec(_cell(_read("quickstart"), "HfApi"), scope)  # noqa: S102 (the notebook's cell)
    assert len(asked) == int(push)
    assert sum(c[0] == "upload_folder" for c in _FakeApi.calls) == uploads
    if uploads:
        assert {c[1]["repo_id"] for c in _FakeApi.calls if c[0] == "upload_folder"} == {repo}


def test_push_cell_needs_a_repo_id(monkeypatch):
    scope = {"PUSH_TO_HUB": True, "HUB_REPO_ID": None, "merged_dir": "m", "adapter_dir": "a",
             "input": lambda q: pytest.fail("asked before checking HUB_REPO_ID")}
    with pytest.raises(ValueError, match="HUB_REPO_ID"):
        exec(_cell(_read("quickstart"), "HfApi"), scope)  # noqa: S102 (the notebook's cell)


# -- executed in a kernel ---------------------------------------------------------------------------------------
def _kernel_env(assets: Path) -> dict[str, str]:
    """The suite's environment for one CPU device (not conftest's 8 fake ones), offline, install cell skipped."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", JAXTUNE_NOTEBOOK_TEST="1", JAXTUNE_ASSETS=str(assets),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _execute(name: str, params: dict, probe: str, assets: Path, tmp_path: Path, monkeypatch) -> tuple[list, dict]:
    """Run the notebook with `params` injected after its parameter cell and `probe` (code printing one JSON line)
    appended; returns (its executed cells, the probe's JSON)."""
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({  # this venv's interpreter, whatever other kernels exist
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = _read(name)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()),
                                                      metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute(env=_kernel_env(assets))
    last = nb.cells[-1].outputs
    return nb.cells, json.loads("".join(o.get("text", "") for o in last if o.output_type == "stream"))


def _text(cells) -> str:
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)


def _images(cells) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart_notebook_tunes_evaluates_and_exports(assets_dir, tmp_path, monkeypatch):
    params = {"MODEL_DIR": str(assets_dir / "models" / "stories260K-hf"),
              "TRAIN_FILE": str(assets_dir / "data" / "alpaca_data_1k.json"),
              "HELDOUT_FILE": str(assets_dir / "data" / "alpaca_en_demo.json"),
              "SEQ_LEN": 256, "LORA_RANK": 8, "STEPS": 30, "LR": 3e-3, "EVAL_EXAMPLES": 64}
    probe = ("import json\nprint(json.dumps({'accelerator': ACCELERATOR, 'template': CHAT_TEMPLATE, "
             "'before': before.loss, 'after': after.loss, 'merged_diff': merged_diff, 'adapter_diff': adapter_diff}))")
    cells, got = _execute("quickstart", params, probe, assets_dir, tmp_path, monkeypatch)
    text = _text(cells)
    assert "install skipped" in text and "found: CPU" in text and got["accelerator"] == "CPU"
    assert got["template"] == "alpaca"  # stories260K has no chat template of its own
    assert got["after"] < got["before"] - 0.3, got
    run = tmp_path / "work" / "runs" / "quickstart"
    losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if m["split"] == "train"]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]), losses
    assert (run / "export" / "merged" / "config.json").is_file()
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()
    assert got["merged_diff"] < 1e-4 and got["adapter_diff"] < 1e-4, got
    assert _images(cells) == 1
    assert "PUSH_TO_HUB is False: nothing was uploaded" in text


def test_pipeline_notebook_runs_a_round_and_reads_its_report(assets_dir, tmp_path, monkeypatch):
    params = {"MODEL_DIR": str(assets_dir / "models" / "stories260K-hf"), "ROUNDS": 1, "OVERRIDES": PIPELINE_SHRINK}
    probe = ("import json\nprint(json.dumps({'story': STORY_MODEL, 'table': table.to_dict(), "
             "'feed': feed.to_dict('records'), 'failed': len(failed), 'steering': len(steering)}))")
    cells, got = _execute("pipeline", params, probe, assets_dir, tmp_path, monkeypatch)
    text = _text(cells)
    assert "install skipped" in text and "found: CPU" in text and got["story"] is True
    assert "jaxtune pipeline pipeline.yaml --set 'model.path=" in text and "--set 'generate.tasks=12'" in text
    report_dir = tmp_path / "work" / "runs" / "pipeline" / "round-1" / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert (report_dir / "report.html").is_file()
    assert list(got["table"]) == ["round 0 (base)", "round 1"]
    row = got["table"]["round 1"]
    assert "% [" in row["constraint satisfaction (all, strict)"] and "pts [" in row["satisfaction vs base"]
    # The failures table is round 0's steering evidence behind round 1's allocation of its 12 tasks.
    assert sum(f["tasks"] for f in got["feed"]) == 12 and {f["round"] for f in got["feed"]} == {1}
    alloc = report["rounds"][1]["allocation"]["instruction"]
    assert {f["constraint"]: f["tasks"] for f in got["feed"]} == alloc["counts"]
    assert 0 < got["steering"] and 0 <= got["failed"] <= got["steering"]
    assert _images(cells) == 1
