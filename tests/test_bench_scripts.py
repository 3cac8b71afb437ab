"""What the benchmark scripts rely on that a GPU session cannot afford to find broken (no timings here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_generate  # noqa: E402
import bench_train  # noqa: E402
import bench_vs_trl  # noqa: E402
from bench import utils as bu  # noqa: E402

from jaxtune import runtime  # noqa: E402


def test_random_weights_of_an_8b_stack_draw_in_slices():
    """The 24 GiB-capped 8B run died drawing one stacked MLP weight (its RNG temporaries: 28 GiB as
    compiled here); drawn slice by slice they stay near one slice's worth."""
    draw = jax.jit(bench_train._random_leaf, static_argnums=(1, 2))
    mem = draw.lower(jax.random.key(0), (32, 14336, 4096), jnp.bfloat16).compile().memory_analysis()
    assert mem.output_size_in_bytes == 32 * 14336 * 4096 * 2 and mem.temp_size_in_bytes < 2 * 2**30
    x = np.asarray(jax.jit(bench_train._random_leaf, static_argnums=(1, 2, 3))(
        jax.random.key(0), (6, 1000, 8), jnp.float32, 10_000))  # forced into 6 slices of 8,000
    assert x.shape == (6, 1000, 8) and abs(x.std() - 0.02) < 1e-3 and abs(x.mean()) < 1e-3
    assert not np.allclose(x[0], x[1])  # each slice has its own key
    assert np.all(np.asarray(draw(jax.random.key(0), (7,), jnp.bfloat16)) == 1)  # norms


def test_flops_per_token_counts_the_model_as_jaxtune_and_peft_do():
    """The MFU column's FLOPs come from jaxtune's own parameter counts (the LoRA count `param_report`
    gives), and they are what PEFT counts for the PyTorch side's model: both sides train the same number."""
    import peft
    import torch

    from jaxtune.lora.config import LoraConfig
    from jaxtune.train.metrics import train_flops_per_token
    from jaxtune.train.partition import param_report

    s = dict(preset="tiny", dtype="float32", scan_layers=True, remat="none", attention="auto", lora_rank=16, seq=256)
    counts = {}
    for mode in ("lora", "full"):
        cfg, _, trainable, frozen = bench_train._jax_model(dict(s, mode=mode), abstract=True)
        counts[mode] = c = bench_train._counts(cfg, dict(s, mode=mode), trainable, frozen)
        assert c["flops_per_token"] == train_flops_per_token(cfg, 256, c["params"], c["trainable"])
    assert counts["full"]["params"] == counts["full"]["trainable"] == cfg.num_params()
    report = param_report(cfg, LoraConfig(rank=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    lora = counts["lora"]
    assert (lora["trainable"], lora["params"]) == (report.lora_params, report.base_params + report.lora_params)

    model = peft.get_peft_model(bu.torch_llama("tiny", torch.float32, "cpu"), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora["trainable"]
    assert sum(p.numel() for p in model.parameters()) == lora["params"]


def test_each_worker_starts_with_its_sides_process_defaults(monkeypatch, tmp_path):
    """jaxtune-side workers run `apply_cpu_defaults()` (before they import jax), PyTorch-side ones the malloc
    setting alone; `--plain-xla` reaches the jaxtune side as the flag's opt-out."""
    jaxtune_side = {"jaxtune", "memory", "counts"}
    for module in (bench_train, bench_generate, bench_vs_trl):
        for name, worker in module.WORKERS.items():
            assert getattr(worker, "jaxtune_side", False) == (name in jaxtune_side), (module.__name__, name)

    calls = []
    monkeypatch.setattr(runtime, "apply_cpu_defaults", lambda: calls.append("cpu defaults"))
    monkeypatch.setattr(runtime, "tune_malloc", lambda: calls.append("malloc"))
    workers = {"j": bu.jaxtune_side(lambda s: {"got": s}), "t": lambda s: {"got": s}}
    for name in workers:
        args = type("Args", (), dict(worker=name, settings=json.dumps({"x": 1}), result=str(tmp_path / name)))
        assert bu.dispatch_worker(args, workers)
        assert json.loads((tmp_path / name).read_text()) == {"got": {"x": 1}}
    assert calls == ["cpu defaults", "malloc"]
    assert not bu.dispatch_worker(type("Args", (), dict(worker=None)), workers)


@pytest.mark.parametrize("plain", [False, True])
def test_plain_xla_turns_off_the_flag_alone(monkeypatch, plain):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {runtime.FAST_CPU_XLA_FLAGS}")
    env = bu.jax_env("cpu", fast_cpu_flags=not plain)
    assert env["XLA_FLAGS"].split().count(runtime.FAST_CPU_XLA_FLAGS) == (0 if plain else 1)
    assert "--xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
    assert (env.get(runtime.OPT_OUT_VAR) == "0") == plain
    # What the worker's apply_cpu_defaults() then does with the flag (jax not imported there yet).
    worker_env = dict(env)
    runtime.apply_default_cpu_flags(worker_env, modules={}, jaxlib_version="0.10.2")
    assert worker_env["XLA_FLAGS"].split().count(runtime.FAST_CPU_XLA_FLAGS) == (0 if plain else 1)
    assert bu.jax_env("gpu", fast_cpu_flags=not plain) == {}


def test_quantize_flag_stores_the_base_quantized_from_real_weights():
    """`--quantize nf4`: the frozen base the step compiles with is NF4 codes (arguments shrink), and the timed
    run quantizes real random weights (codes drawn directly would all be zero)."""
    from flax import nnx

    from jaxtune.model.quant import Quantized

    s = dict(preset="tiny", mode="lora", dtype="float32", scan_layers=True, remat="full", attention="xla",
             lora_rank=16, seq=64, batch=1, loss_chunk=None, lr=1e-4, steps=1, warmup=0)
    nf4 = bench_train.jax_memory_worker(dict(s, quantize="nf4"))
    assert nf4["device"] == "cpu" and nf4["temp"] > 0
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    frozen_bytes = {q: nbytes(bench_train._jax_model(dict(s, quantize=q), abstract=True)[3]) for q in (None, "nf4")}
    assert frozen_bytes["nf4"] < 0.4 * frozen_bytes[None]
    _, _, _, frozen = bench_train._jax_model(dict(s, quantize="nf4"))
    codes = [v for _, v in nnx.to_flat_state(frozen) if isinstance(v, Quantized)]
    assert codes and all(np.asarray(v.get_value()).any() for v in codes)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_param_report_counts_the_quantized_base_at_its_stored_size(kind):
    """`jaxtune params --quantize`: the QLoRA row's weights are the LoRA row's with each adapted linear's
    bf16 bytes replaced by `quantized_nbytes`; parameters stay logical elements; adapters and AdamW as LoRA."""
    import dataclasses

    from jaxtune.lora.config import LoraConfig
    from jaxtune.model.quant import quantized_nbytes
    from jaxtune.train.partition import param_report

    s = dict(preset="tiny", mode="lora", dtype="bfloat16", scan_layers=False, remat="none", attention="auto",
             lora_rank=16)
    cfg = bench_train._jax_model(s, abstract=True)[0]
    lcfg = LoraConfig(rank=16, alpha=32, dropout=0.0, target_modules="all-linear", quantize=kind)
    rep = param_report(cfg, lcfg)
    assert rep == dataclasses.replace(param_report(cfg, dataclasses.replace(lcfg, quantize=None)),
                                      qlora_memory=rep.qlora_memory)
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    saved = L * sum(2 * o * n - quantized_nbytes((o, n), lcfg.quant_spec()) for o, n in shapes)
    assert rep.qlora_memory["weights"] == rep.lora_memory["weights"] - saved > 0
    assert {k: rep.qlora_memory[k] for k in ("grads", "optimizer")} == {
        k: rep.lora_memory[k] for k in ("grads", "optimizer")}
