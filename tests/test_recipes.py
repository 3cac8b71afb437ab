"""Every recipe in configs/ compiles its train step on fake CPU devices shaped like its mesh, from abstract
weights (no download), and the quickstart recipe really trains through the CLI."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import pytest

from jaxtune.cli.main import main
from jaxtune.hf.families import from_hf_config
from jaxtune.model.sharding import make_mesh
from jaxtune.recipe import load_recipe
from jaxtune.train.plan import format_plan, lower_train_step

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench.recipes import ARCHITECTURES, DEVICE_MEMORY  # noqa: E402

# Training recipes; configs/pipeline-*.yaml are pipeline recipes (tests/test_pipeline_config.py).
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("pipeline-"))



def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _mesh_for(mesh_cfg: dict):
    """Fake devices shaped like the recipe's mesh (all 8 where one axis is -1)."""
    sizes = list(mesh_cfg.values())
    n = len(jax.devices()) if -1 in sizes else int(jax.numpy.prod(jax.numpy.array(sizes)))
    return make_mesh(mesh_cfg, jax.devices()[:n])


def test_every_recipe_is_short_and_has_an_architecture():
    assert {p.name for p in RECIPES} == set(ARCHITECTURES)
    for p in RECIPES:
        assert len(p.read_text().splitlines()) <= 35, p.name


# The QLoRA recipe's compile is test_qlora_recipe_fits_one_16_gb_gpu's (with the attention a GPU would run).
@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name != "llama3-8b-qlora.yaml"], ids=lambda p: p.stem)
def test_recipe_compiles_on_its_mesh(recipe):
    import transformers

    # Dense attention compiles fastest on CPU; shapes and shardings do not depend on the attention kernel.
    cfg = load_recipe(recipe, ["model.attention_impl=xla"])
    if -1 not in cfg.mesh.values() and math.prod(cfg.mesh.values()) > len(jax.devices()):
        pytest.skip(f"{recipe.name}: its mesh needs {math.prod(cfg.mesh.values())} devices, the suite has "
                    f"{len(jax.devices())}; scripts/bench_tpu_compile.py (run by .ci/run) compiles it for its slice")
    cls, kw = ARCHITECTURES[recipe.name]
    model_cfg = from_hf_config(getattr(transformers, cls)(**kw))
    mesh = _mesh_for(cfg.mesh)
    start = time.perf_counter()
    plan, _ = lower_train_step(cfg, model_cfg, mesh)
    seconds = time.perf_counter() - start
    # XLA:CPU's estimate over-counts: CPU has no bf16 matmul, so it keeps fp32 copies of the bf16 weights.
    peak, device = plan.memory["peak_estimate"], DEVICE_MEMORY.get(recipe.name)
    print(f"\n{recipe.name} (CPU compile, {seconds:.1f} s; bf16 is upcast on CPU, so accelerators need less):\n"
          f"{format_plan(plan)}\npeak estimate   {_gib(peak)} per device" + (f" of {_gib(device)}" if device else ""))
    assert peak > 0
    if device:
        assert peak <= device, f"{recipe.name}: {_gib(peak)} per device, its hardware has {_gib(device)}"
    assert plan.n_params == model_cfg.num_params()
    assert 0 < plan.n_trainable <= plan.n_params
    # The big models' weights really are split over the mesh's model axes.
    q_spec = next(s for name, s in plan.param_specs.items() if name.endswith(("q_proj/weight", "qkv_proj/weight")))
    for axis in ("fsdp", "tensor"):
        if mesh.shape[axis] > 1:
            assert axis in str(q_spec), (recipe.name, q_spec)
    if mesh.shape["expert"] > 1:
        expert_spec = next(s for name, s in plan.param_specs.items() if name.endswith("experts/gate_up_proj"))
        assert "expert" in str(expert_spec), (recipe.name, expert_spec)


def test_qlora_recipe_fits_one_16_gb_gpu():
    """Llama 3 8B NF4 QLoRA at seq 4096 within a 16 GB GPU, as compiled here. Blockwise attention stands in for
    the GPU's flash kernel (the suite's dense `xla` attention holds 4096² scores per head); XLA:CPU still counts
    fp32 copies of each layer's dequantized weights, so a GPU needs less. The NF4 base is what makes it fit."""
    import transformers

    cfg = load_recipe(REPO / "configs" / "llama3-8b-qlora.yaml", ["model.attention_impl=blockwise"])
    cls, kw = ARCHITECTURES["llama3-8b-qlora.yaml"]
    plan, _ = lower_train_step(cfg, from_hf_config(getattr(transformers, cls)(**kw)), _mesh_for(cfg.mesh))
    assert plan.memory["peak_estimate"] <= 16 * 10**9, _gib(plan.memory["peak_estimate"])
    assert plan.memory["arguments"] < 7 * 2**30  # bf16 base alone: 15 GiB
    assert plan.n_params == 8_030_261_248 and 0 < plan.n_trainable < plan.n_params // 100
    assert plan.batch_shape == (16, 1, 4096)


def test_quickstart_trains_through_the_cli(assets_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    # seq_len 128 keeps it fast but the Alpaca prompt then fills 730 of the 1,000 records: allow that here.
    overrides = [f"output.run_dir={run_dir}", "train.steps=4", "optim.warmup_steps=1", "train.eval_every=2",
                 "data.cache_dir=null", "data.seq_len=128", "data.max_dropped_fraction=0.75",
                 "model.attention_impl=xla", "output.progress=false", "output.tensorboard=false"]
    if not (REPO.parent / "shared" / "assets").samefile(assets_dir):
        overrides += [f"model.path={assets_dir / 'models' / 'stories260K-hf'}",
                      f"data.train={assets_dir / 'data' / 'alpaca_data_1k.json'}"]
    argv = ["train", "configs/quickstart.yaml"] + [x for o in overrides for x in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "done: step 4/4" in out and "exported PEFT adapter" in out
    assert "dropped or skipped: 730 of 1000 (73.0%)" in out
    assert json.loads((run_dir / "data_report.json").read_text())["dropped"] == {"prompt fills seq_len": 730}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    assert (run_dir / "export" / "merged" / "model.safetensors").is_file()
    assert (run_dir / "export" / "adapter" / "adapter_config.json").is_file()

    assert main(["train", "configs/quickstart.yaml", "--set", "output.run_dir=" + str(run_dir)] +
                [x for o in overrides[1:] for x in ("--set", o)]) == 2  # refuses to overwrite without --resume
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_bad_recipe_is_a_one_line_cli_error(tmp_path, capsys, extra):
    """A recipe mistake exits 2 with the file, line and key, and no traceback (on every path through the
    command, the dry run included)."""
    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  path: x\n  dtyp: float32\ndata:\n  train: d.json\n")
    assert main(["train", str(bad)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:3: model.dtyp: unknown key") and "Traceback" not in err
    assert main(["train", str(tmp_path / "none.yaml")] + extra) == 2
    assert "recipe file not found" in capsys.readouterr().err


@pytest.mark.parametrize("mesh, refused", [("{data: 2}", True), ("{data: 1}", False)])
def test_cpu_flash_on_a_multi_device_mesh_is_refused_before_loading(tmp_path, mesh, refused):
    """The C++ kernel is a custom call XLA can only replicate: naming it on a mesh of several devices is a
    recipe error, raised when the mesh is built (before any model or data is loaded)."""
    from jaxtune.recipe import ConfigError
    from jaxtune.train.plan import build_mesh

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: x\n  attention_impl: cpu_flash\ndata:\n  train: d.json\n"
                      f"output:\n  run_dir: {tmp_path / 'run'}\nmesh: {mesh}\n")
    cfg = load_recipe(recipe)
    if refused:
        with pytest.raises(ConfigError, match="cpu_flash runs on one device, this mesh has 2"):
            build_mesh(cfg)
    else:
        assert build_mesh(cfg).size == 1
