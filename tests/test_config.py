"""Recipe loading: validation errors name file, line and key path; --set overrides; path resolution."""

from __future__ import annotations

import textwrap

import pytest

from jaxtune.recipe import ConfigError, RecipeConfig, apply_overrides, dump_recipe, load_recipe
from jaxtune.lora.config import LoraConfig

BASE = """\
model:
  path: some/model
data:
  train: data.json
  seq_len: 64
train:
  steps: 10
  batch_size: 4
output:
  run_dir: runs/x
"""


def _write(tmp_path, text: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(path, list(overrides))
    return str(e.value)


def test_minimal_recipe_gets_defaults(tmp_path):
    cfg = load_recipe(_write(tmp_path, BASE))
    assert isinstance(cfg, RecipeConfig)
    assert cfg.lora == LoraConfig()  # train.mode defaults to lora
    assert cfg.mesh == {"data": -1}
    assert cfg.train.steps == 10 and cfg.data.seq_len == 64
    assert cfg.param_dtype == "float32"


def test_full_finetune_of_bf16_keeps_fp32_master_weights(tmp_path):
    cfg = load_recipe(_write(tmp_path, BASE), ["train.mode=full", "model.dtype=bfloat16"])
    assert cfg.lora is None and cfg.param_dtype == "float32"
    lora = load_recipe(_write(tmp_path, BASE), ["model.dtype=bfloat16"])
    assert lora.param_dtype == "bfloat16"


def test_unknown_key_names_file_line_and_path(tmp_path):
    p = _write(tmp_path, BASE.replace("  batch_size: 4", "  batch_sze: 4"))
    msg = _error(p)
    assert msg.startswith(f"{p}:8: train.batch_sze: unknown key")
    assert "batch_size" in msg  # lists what the section takes


@pytest.mark.parametrize("line, expected", [
    ("  steps: ten", "train.steps: expected an integer, got 'ten'"),
    ("  steps: true", "train.steps: expected an integer, got True"),
    ("  steps: 1.5", "train.steps: expected an integer"),
])
def test_wrong_type_names_path_and_line(tmp_path, line, expected):
    p = _write(tmp_path, BASE.replace("  steps: 10", line))
    msg = _error(p)
    assert msg == f"{p}:7: {expected}" or msg.startswith(f"{p}:7: {expected}")


def test_nested_section_errors_keep_their_path(tmp_path):
    p = _write(tmp_path, BASE + "lora:\n  rank: 0\nmesh:\n  data: two\n")
    assert "lora.rank must be a positive integer" in _error(p)
    p = _write(tmp_path, BASE + "mesh:\n  data: two\n")
    assert _error(p) == f"{p}:12: mesh.data: expected an integer, got 'two'"
    p = _write(tmp_path, BASE + "lora:\n  target_modules: 3\n")
    assert "lora.target_modules: expected str or a list, got 3" in _error(p)


def test_missing_required_key(tmp_path):
    p = _write(tmp_path, BASE.replace("  path: some/model\n", "  dtype: float32\n"))
    assert _error(p).endswith("model.path: required key is missing")
    p = _write(tmp_path, "model:\n  path: m\ndata:\n  train: d\n")
    assert "output: required key is missing" in _error(p)


@pytest.mark.parametrize("override, expected", [
    ("train.mode=full", "lora: a lora: section is set but train.mode is full"),
    ("train.loss_chunk=48", "train.loss_chunk: 48 must divide data.seq_len=64"),
    ("optim.grad_accum_steps=3", "train.batch_size: 4 is not divisible by optim.grad_accum_steps=3"),
    ("mesh.model=2", "mesh.model: unknown mesh axis"),
    ("data.seq_len=1", "data.seq_len must be an integer >= 2"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("train.nan_policy=ignore", "train.nan_policy: 'ignore' is not one of"),
    ("model.remat=some", "model.remat: 'some' is not one of"),
    ("train.forgetting_every=10", "train.forgetting_every: needs a forgetting: section"),
])
def test_cross_field_validation(tmp_path, override, expected):
    text = BASE + "lora:\n  rank: 4\n" if override == "train.mode=full" else BASE
    msg = _error(_write(tmp_path, text), [override])
    assert expected in msg
    assert msg.startswith(f"--set {override}:") or msg.startswith(str(tmp_path))


def test_set_overrides_parse_yaml_values_and_create_sections():
    raw = {"train": {"steps": 10}}
    apply_overrides(raw, ["train.steps=50", "lora.target_modules=[q_proj, v_proj]", "data.validation=null",
                          "optim.lr=1e-3", "mesh.fsdp=2"])
    assert raw == {"train": {"steps": 50}, "lora": {"target_modules": ["q_proj", "v_proj"]},
                   "data": {"validation": None}, "optim": {"lr": 1e-3}, "mesh": {"fsdp": 2}}
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["train.steps"])


def test_set_errors_name_the_override(tmp_path):
    msg = _error(_write(tmp_path, BASE), ["train.stepz=5"])
    assert msg.startswith("--set train.stepz=5: train.stepz: unknown key")


def test_relative_paths_prefer_cwd_then_recipe_dir(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "configs"
    recipe_dir.mkdir()
    (recipe_dir / "local-model").mkdir()
    (recipe_dir / "data.json").write_text("[]")
    p = _write(recipe_dir, BASE.replace("some/model", "local-model"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_recipe(p)
    assert cfg.model.path == str(recipe_dir / "local-model")
    assert cfg.data.train == str(recipe_dir / "data.json")
    (elsewhere / "local-model").mkdir()
    assert load_recipe(p).model.path == "local-model"  # the working directory wins
    hub = load_recipe(p, ["model.path=meta-llama/Meta-Llama-3-8B"])
    assert hub.model.path == "meta-llama/Meta-Llama-3-8B"  # found nowhere: kept as written


def test_dump_round_trips(tmp_path):
    cfg = load_recipe(_write(tmp_path, BASE + "lora:\n  rank: 4\n  rank_pattern: {q_proj: 8}\n"),
                      ["model.add_special_tokens=['<|im_start|>']"])
    again = load_recipe(_write(tmp_path, dump_recipe(cfg), "dumped.yaml"))
    assert again == cfg


@pytest.mark.parametrize("override, detail", [
    ("train..steps=5", "non-empty keys joined by single dots, e.g. --set train.steps=50 (key component '')"),
    (".steps=5", "(key component '')"),
    ("train.=5", "(key component '')"),
    ("train. steps=5", "(key component ' steps')"),
    ("trian.steps=5", "trian: unknown key"),
    ("train.steps.max=5", "train.steps is 10, not a mapping"),
    ("lora.rank=abc", "lora.rank: expected an integer"),
])
def test_bad_set_key_paths_blame_the_set_argument(tmp_path, override, detail):
    msg = _error(_write(tmp_path, BASE), [override])
    assert msg.startswith(f"--set {override}: ") and detail in msg, msg


def test_duplicate_yaml_keys_name_the_line(tmp_path):
    p = _write(tmp_path, BASE.replace("  batch_size: 4\n", "  batch_size: 4\n  steps: 20\n"))
    assert _error(p).startswith(f"{p}:9: not valid YAML: duplicate key 'steps' (first on line 7)")


def test_undecodable_or_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"model:\n  path: caf\xc3\n")
    assert _error(p).startswith(f"{p}: not UTF-8 text")
    p = _write(tmp_path, BASE.replace("  batch_size: 4", "\tbatch_size: 4"))
    assert _error(p).startswith(f"{p}:8: not valid YAML")
