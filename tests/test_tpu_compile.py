"""XLA:TPU compiles without a TPU (libtpu's compile-only client): the train step of a small model compiled for a
v5e slice, splash attention through Mosaic run per chip, and `jaxtune train --dry-run --topology`. The TPU
recipes' own compiles are long (minutes each): scripts/bench_tpu_compile.py runs them, from .ci/run."""

from __future__ import annotations

import importlib.util
import re

import pytest

from jaxtune.cli.main import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (pip install -e '.[tpu-compile]') for a compile-only TPU client")


def _recipe(tmp_path, stories_dir, assets_dir, mesh="{data: 4}", extra=""):
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  path: {stories_dir}\n  dtype: bfloat16\n  scan_layers: true\n  remat: full\n"
                    f"data:\n  train: {assets_dir / 'data' / 'alpaca_data_1k.json'}\n  seq_len: 256\n"
                    f"lora:\n  rank: 4\n  target_modules: all-linear\ntrain:\n  batch_size: 8\n{extra}"
                    f"mesh: {mesh}\noutput:\n  run_dir: {tmp_path / 'run'}\n")
    return path


def test_dry_run_for_a_topology_compiles_splash_per_chip(tmp_path, stories_dir, assets_dir, capsys, monkeypatch):
    """`jaxtune train --dry-run --topology` compiles with XLA:TPU. `auto` attention on the TPU mesh is splash (the
    platform comes from the operands' mesh, not this CPU host), compiled by Mosaic into a `tpu_custom_call`, and
    each chip runs it on its own rows and KV heads: XLA cannot partition the custom call, so without `shard_map`
    it would gather every row onto every chip."""
    from jaxtune.train import plan as plan_lib

    compiled = []
    lower = plan_lib.lower_train_step
    monkeypatch.setattr(plan_lib, "lower_train_step", lambda *a: compiled.append(lower(*a)) or compiled[-1])
    recipe = _recipe(tmp_path, stories_dir, assets_dir, mesh="{data: 2, tensor: 2}")
    assert main(["train", str(recipe), "--dry-run", "--topology", "v5e:2x2"]) == 0
    out = capsys.readouterr().out
    assert "on tpu (4 × TPU v5 lite)" in out and "memory/device" in out and "flops/device" in out
    assert "XLA:CPU's estimate" not in out
    plan, executable = compiled[0]
    assert 0 < plan.memory["peak_estimate"] < 2**30 and plan.flops > 0
    calls = [line for line in executable.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert calls, "splash did not compile to a Mosaic kernel"
    # Splash's operands are [rows, KV heads, group, T, head_dim]: 8 rows over data=2 and 4 KV heads over tensor=2
    # leave 4 rows and 2 KV heads per chip.
    cfg = plan.model_config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    shapes = {m for line in calls for m in re.findall(rf"\[(\d+),(\d+),{group},256,{cfg.head_dim}\]", line)}
    assert shapes == {("4", str(cfg.num_key_value_heads // 2))}, shapes

    assert main(["train", str(recipe), "--dry-run", "--topology", "v9z:1x1"]) == 2
    assert "libtpu cannot build this topology" in capsys.readouterr().err
    assert main(["train", str(recipe), "--topology", "v5e:2x2"]) == 2
    assert "--topology applies to --dry-run only" in capsys.readouterr().err


def test_topology_devices_run_beside_another_libtpu_process():
    """libtpu allows one process per host unless told otherwise; a compile-only client holds no chip, so
    `topology_devices` (and `--dry-run --topology`) works while another libtpu process runs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    holder = subprocess.Popen([sys.executable, "-c", "from jax.experimental import topologies; "
                               "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2'); "
                               "print('held', flush=True); import time; time.sleep(120)"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        holder.stdout.readline()  # "held"; or nothing if another process holds the lock already: as good
        code = ("from jaxtune.train.plan import topology_devices; "
                "print(len(topology_devices('v5e:2x2')))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "4", out.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()


def test_one_chip_topology():
    """`v5e:1x1` is one chip on its own host: libtpu's default host is a 2x2 block, which it cannot hold."""
    from jaxtune.train.plan import topology_devices

    (device,) = topology_devices("v5e:1x1")
    assert device.platform == "tpu"
    assert len(topology_devices("v5e:2x2")) == 4


def test_int8_weights_go_into_the_tpu_matmul_undequantized():
    """XLA:TPU fuses the int8 codes' conversion into the matmul (the scale applies to its output): no bf16 copy
    of the weight is materialised, where an NF4 weight is dequantized into one first."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.model.layers import Linear
    from jaxtune.model.quant import QuantSpec, quantize_param
    from jaxtune.train.plan import topology_devices

    sharding = jax.sharding.SingleDeviceSharding(topology_devices("v5e:1x1")[0])
    temps = {}
    for kind in ("int8", "nf4"):
        linear = Linear(1024, 1024, bias=False, axes=("mlp", "embed"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0))
        quantize_param(linear, "weight", QuantSpec(kind))
        graphdef, state = nnx.split(linear)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
        x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=sharding)
        compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(abstract, x).compile()
        temps[kind] = compiled.memory_analysis().temp_size_in_bytes
    weight_bf16 = 1024 * 1024 * 2
    assert temps["int8"] < weight_bf16 <= temps["nf4"], temps
