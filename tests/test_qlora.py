"""QLoRA in the model: a quantized frozen base behaves as its dequantized float weights plus the adapter, is
quantized as the checkpoint loads, stays frozen in training, keeps no layer's dequantized copy for the backward
pass, shards like the float weights, and refuses what it cannot store."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import build
from jax.sharding import PartitionSpec as P
from test_family_sharding import _logits as mesh_logits
from test_family_sharding import _split
from test_moe_lora import randomize_b

from jaxtune import load_pretrained
from jaxtune.lora.apply import apply_lora, merge_lora
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.lora.quantize import quantize_base, quantize_sites
from jaxtune.model import layers
from jaxtune.model.quant import Quantized, param_value, unquantize_param
from jaxtune.model.sharding import make_mesh
from jaxtune.recipe import RecipeConfig
from jaxtune.structs import from_dict
from jaxtune.train import loop
from jaxtune.train.partition import split_trainable, trainable_filter
from jaxtune.train.step import loss_and_grads

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# variant → LoRA settings besides `quantize`: a GQA Llama, Phi-3's fused qkv/gate_up, Gemma's tied embedding
# quantized too (scope "all"), Mixtral's expert tensors (PEFT's target_parameters).
VARIANTS = {
    "llama_gqa": {},
    "phi3": {},
    "gemma": {"quantize_scope": "all"},
    "mixtral": {"target_modules": ("q_proj", "v_proj"), "target_parameters": EXPERTS},
}


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logits(model, ids) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids)))


def _ids(rows: int = 2, t: int = 12) -> np.ndarray:
    return np.asarray(np.random.default_rng(0).integers(0, 128, (rows, t)), np.int32)


def _quantized_paths(model) -> set[tuple]:
    return {p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v, Quantized)}


def _as_float(model, cfg: LoraConfig):
    """`merge_lora(model)` with every weight still quantized (an un-adapted one) replaced by its fp32
    dequantized value: a model of float weights only, the base QLoRA computes with."""
    merged = merge_lora(model)
    for _, module, name in quantize_sites(merged, cfg):
        if getattr(module, f"{name}_quant", None) is not None:
            unquantize_param(module, name, param_value(module, name, jnp.float32))
    assert not _quantized_paths(merged)
    return merged


# Each variant in both formats, the two layouts alternating (the full product costs ~3x the time).
PARITY = [(name, kind, scan) for i, name in enumerate(VARIANTS) for kind, scan in
          [("nf4", bool(i % 2)), ("int8", not i % 2)]]


@pytest.mark.parametrize("name,kind,scan", PARITY,
                         ids=[f"{n}-{k}-{'scan' if s else 'layers'}" for n, k, s in PARITY])
def test_qlora_equals_dequantized_base_plus_adapter(hf_zoo, name, kind, scan):
    path, _ = hf_zoo(name)
    cfg = LoraConfig(rank=2, alpha=4.0, dropout=0.0, quantize=kind, **VARIANTS[name])
    qlora = randomize_b(apply_lora(quantize_base(load_pretrained(path, scan_layers=scan), cfg), cfg))
    assert _quantized_paths(qlora)
    ids = _ids()
    ours = _logits(qlora, ids)
    np.testing.assert_allclose(ours, _logits(_as_float(qlora, cfg), ids), rtol=0, atol=1e-5)
    unquantized = randomize_b(apply_lora(load_pretrained(path, scan_layers=scan), cfg))
    assert np.abs(ours - _logits(unquantized, ids)).max() > 1e-3


@pytest.mark.parametrize("scope,quantized,floating", [
    ("targets", {"q_proj", "v_proj"}, {"k_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
     {"embed_tokens", "lm_head"}),
    ("all", {"q_proj", "k_proj", "down_proj", "embed_tokens", "lm_head"}, set()),
])
def test_quantize_scope(hf_zoo, scope, quantized, floating):
    path, _ = hf_zoo("llama_gqa")  # untied: lm_head is a weight of its own
    cfg = LoraConfig(target_modules=("q_proj", "v_proj"), quantize="nf4", quantize_scope=scope)
    model = quantize_base(load_pretrained(path), cfg)
    layer = model.layers[0]
    modules = {"embed_tokens": model.embed_tokens, "lm_head": model.lm_head, **vars(layer.self_attn),
               **vars(layer.mlp)}
    for name in quantized:
        assert isinstance(modules[name].weight, Quantized), name
        assert modules[name].weight[...].dtype == jnp.uint8, name
    for name in floating:
        assert not isinstance(modules[name].weight, Quantized), name
        assert modules[name].weight_quant is None and modules[name].weight[...].dtype == jnp.float32, name


@pytest.mark.parametrize("name,scan", [("llama_gqa", False), ("llama_gqa", True), ("qwen3_moe", True)])
def test_quantize_at_load_equals_quantize_after(hf_zoo, name, scan):
    path, _ = hf_zoo(name)
    cfg = LoraConfig(dropout=0.0, quantize="nf4", quantize_scope="all", target_parameters=EXPERTS)
    at_load = nnx.to_flat_state(nnx.state(load_pretrained(path, scan_layers=scan,
                                                           prepare=lambda m: quantize_base(m, cfg))))
    after = nnx.to_flat_state(nnx.state(quantize_base(load_pretrained(path, scan_layers=scan), cfg)))
    assert [p for p, _ in at_load] == [p for p, _ in after]
    assert sum(isinstance(v, Quantized) for _, v in at_load) > 10
    for (p, a), (_, b) in zip(at_load, after):
        assert type(a) is type(b) and a[...].dtype == b[...].dtype, p
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


# ---------------------------------------------------------------------------------------------- training


def _recipe(stories_dir, train_file, run_dir, **sections) -> RecipeConfig:
    raw = {
        "model": {"path": str(stories_dir), "attention_impl": "xla"},
        "data": {"train": str(train_file), "chat_template": "alpaca", "seq_len": 128, "val_fraction": 0.0,
                 "cache_dir": None},
        "lora": {"rank": 4, "dropout": 0.0, "quantize": "nf4"},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 4, "save_every": 0, "log_every": 1},
        "output": {"run_dir": str(run_dir), "tensorboard": False, "progress": False},
        "mesh": {"data": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return from_dict(RecipeConfig, raw)


def _numpy_state(model) -> dict:
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_train_moves_adapters_only_and_lowers_loss(stories_dir, short_alpaca, tmp_path, monkeypatch):
    seen = {}
    load, finish = loop.load_model, loop.finish

    def recording_load(cfg, mesh):
        model, tokenizer, token_ids = load(cfg, mesh)
        seen["before"] = _numpy_state(model)
        seen["quantized"] = _quantized_paths(model)
        return model, tokenizer, token_ids

    def recording_finish(run, state):
        seen["after"] = _numpy_state(run.model(state))
        return finish(run, state)

    monkeypatch.setattr(loop, "load_model", recording_load)
    monkeypatch.setattr(loop, "finish", recording_finish)
    one_batch = tmp_path / "four.json"  # every step sees the same 4 records: the loss falls step after step (the
    # first step's warm-up learning rate is 0)
    one_batch.write_text(json.dumps(json.loads(short_alpaca.read_text())[:4]))
    result = loop.train(_recipe(stories_dir, one_batch, tmp_path / "run", data={"seq_len": 256},
                                output={"export": True}))
    assert result.step == 6 and result.skipped_steps == 0
    losses = result.losses
    assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < losses[0] - 1.0, losses
    before, after = seen["before"], seen["after"]
    assert before.keys() == after.keys()
    assert len(seen["quantized"]) >= 5 * 7  # every linear of the 5 layers (all-linear targets)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and all(p[-1] in ("lora_A", "lora_B") for p in changed), sorted(changed)[:5]
    assert any(p[-1] == "lora_B" for p in changed)
    for p in seen["quantized"]:
        assert after[p].dtype == before[p].dtype
        np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))

    # `jaxtune export --run` merges onto the base the run trained against (quantized again from its recipe), as
    # the run's own export did; `--adapter` merges onto the float base, which differs.
    from jaxtune.cli.main import main
    from jaxtune.hf.safetensors import read_safetensors

    run_merged = dict(read_safetensors(tmp_path / "run" / "export" / "merged" / "model.safetensors"))
    for name, args in (("again", ["--run", str(tmp_path / "run")]),
                       ("float", ["--adapter", str(tmp_path / "run" / "export" / "adapter")])):
        assert main(["export", "--model", str(stories_dir), *args, "--out", str(tmp_path / name)]) == 0
    again = dict(read_safetensors(tmp_path / "again" / "model.safetensors"))
    on_float = dict(read_safetensors(tmp_path / "float" / "model.safetensors"))
    assert again.keys() == run_merged.keys()
    for name in run_merged:
        np.testing.assert_array_equal(again[name], run_merged[name], err_msg=name)
    assert not np.array_equal(on_float["model.layers.0.self_attn.q_proj.weight"],
                              run_merged["model.layers.0.self_attn.q_proj.weight"])


# ---------------------------------------------------------------------------------------------- memory

MEMORY_SIZES = {"hidden_size": 256, "intermediate_size": 1024, "vocab_size": 256, "num_attention_heads": 4,
                "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """Llamas of large weights and small activations (seq 32, batch 1), 2 and 8 layers."""
    root = tmp_path_factory.mktemp("wide")
    for n in (2, 8):
        build("llama_gqa", root / str(n), num_hidden_layers=n, **MEMORY_SIZES)
    return {n: root / str(n) for n in (2, 8)}


def _layer_weight_bytes() -> int:
    h, i, kv = MEMORY_SIZES["hidden_size"], MEMORY_SIZES["intermediate_size"], 2 * 64
    return 4 * (2 * h * h + 2 * kv * h + 3 * h * i)  # one layer's dequantized fp32 q, o, k, v, gate, up, down


def _step_temp_bytes(path) -> int:
    cfg = LoraConfig(rank=4, dropout=0.0, quantize="nf4", quantize_scope="all-linear")
    model = apply_lora(load_pretrained(path, scan_layers=True, remat="none",
                                       prepare=lambda m: quantize_base(m, cfg)), cfg)
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))
    ids = np.arange(32, dtype=np.int32)[None] % 256
    ones = np.ones_like(ids)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": ones, "segment_ids": ones,
             "positions": np.arange(32, dtype=np.int32)[None]}
    step = jax.jit(functools.partial(loss_and_grads), static_argnums=0)
    compiled = step.lower(graphdef, trainable, frozen, batch, jax.random.key(0)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _growth_per_layer(models) -> float:
    return (_step_temp_bytes(models[8]) - _step_temp_bytes(models[2])) / 6


def test_scanned_step_keeps_no_dequantized_weights(wide_models):
    assert _growth_per_layer(wide_models) < _layer_weight_bytes() / 2


def test_keeping_dequantized_weights_grows_per_layer(wide_models, monkeypatch):
    """The negative control: without `recomputed` around the quantized matmuls, the step keeps every layer's
    dequantized weights for the backward pass."""
    monkeypatch.setattr(layers, "recomputed", lambda fn: fn)
    assert _growth_per_layer(wide_models) >= 0.9 * _layer_weight_bytes()


# ---------------------------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def shard_model(tmp_path_factory):
    """Input sizes a multiple of 64·fsdp, so row-layout scales split over `fsdp` as the codes do."""
    path = tmp_path_factory.mktemp("shard") / "llama"
    build("llama_gqa", path, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return path


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_leaves_shard_like_the_float_weight(shard_model, kind):
    cfg = LoraConfig(quantize=kind, quantize_scope="all-linear")
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    prepare = functools.partial(quantize_base, cfg=cfg)
    quantized = load_pretrained(shard_model, mesh=mesh, scan_layers=True, prepare=prepare)
    floating = load_pretrained(shard_model, mesh=mesh, scan_layers=True)
    for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        q, f = (functools.reduce(getattr, part.split("."), m.layers) for m in (quantized, floating))
        want = _split(f.weight)
        assert "tensor" in want and "fsdp" in want, part
        assert _split(q.weight) == want, part
        if kind == "nf4":
            assert q.weight_absmax.ndim == 3 and _split(q.weight_absmax) == want, part
            for leaf in ("weight_nested_absmax", "weight_offset", "weight_nested_quant_map"):
                assert getattr(q, leaf)[...].sharding.is_fully_replicated, (part, leaf)
        else:
            assert _split(q.weight_scale) == P(*want[:-1]), part
    ids = np.asarray(np.random.default_rng(0).integers(0, 128, (4, 16)), np.int32)
    single = load_pretrained(shard_model, scan_layers=True, prepare=prepare)
    # fp32 sums of 256-512 terms split over shards add in another order: ~1.2e-5 apart at most here.
    np.testing.assert_allclose(mesh_logits(quantized, ids, mesh), mesh_logits(single, ids), rtol=1e-5, atol=3e-5)


# ---------------------------------------------------------------------------------------------- refusals


def test_nf4_refuses_an_odd_input_size_naming_the_module(tmp_path):
    path = tmp_path / "odd"
    build("llama_gqa", path, intermediate_size=97)
    cfg = LoraConfig(target_modules=("down_proj",), quantize="nf4")
    for load in (lambda: quantize_base(load_pretrained(path), cfg),
                 lambda: load_pretrained(path, prepare=lambda m: quantize_base(m, cfg))):
        with pytest.raises(LoraConfigError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and "down_proj" in msg and "97" in msg and "int8" in msg, msg
    int8 = LoraConfig(target_modules=("down_proj",), quantize="int8")
    assert isinstance(quantize_base(load_pretrained(path), int8).layers[0].mlp.down_proj.weight, Quantized)


def test_recipe_refuses_quantized_embedding_with_added_tokens(tmp_path):
    raw = {"model": {"path": "m", "add_special_tokens": ["<|im_start|>"]}, "data": {"train": "d.json"},
           "output": {"run_dir": str(tmp_path)}, "lora": {"quantize": "nf4", "quantize_scope": "all"}}
    with pytest.raises(ValueError, match="lora.quantize_scope.*all-linear"):
        from_dict(RecipeConfig, raw)
    raw["lora"]["quantize_scope"] = "all-linear"
    assert from_dict(RecipeConfig, raw).lora.quantize_scope == "all-linear"
