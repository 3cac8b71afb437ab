"""The new families on a mesh of the 8 fake CPU devices: loaded weights really are split (attention over
`tensor`×`fsdp`, experts over `expert`), jitted logits equal the single-device model's, and a LoRA step (expert
adapters included) equals the single-device step."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import _batch

from jaxtune import load_pretrained
from jaxtune.lora.apply import apply_lora
from jaxtune.lora.config import LoraConfig
from jaxtune.model.sharding import batch_spec, make_mesh, shard_batch
from jaxtune.train.partition import split_trainable, trainable_filter
from jaxtune.train.step import loss_and_grads

DENSE_MESH = {"fsdp": 2, "tensor": 4}
MOE_MESH = {"expert": 4, "tensor": 2}
# Gemma 1 and Phi-4-mini share their layouts with Gemma 2 and Phi-3.
DENSE = ["gemma2", "gemma3", "phi3", "olmo2", "granite"]
MOE = ["mixtral", "qwen3_moe"]


def _ids(rows: int = 4, t: int = 24) -> np.ndarray:
    """24 positions: past every sliding window and past Phi-4-mini's original context (longrope's long factors)."""
    return np.asarray(np.random.default_rng(0).integers(0, 128, (rows, t)), np.int32)


def _logits(model, ids, mesh=None):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    if mesh is not None:
        ids = jax.device_put(ids, NamedSharding(mesh, batch_spec(2, mesh=mesh)))
    return np.asarray(forward(state, ids))


def _split(leaf) -> P:
    """The leaf's PartitionSpec, after checking its shards are really smaller than the whole."""
    value = leaf[...]
    assert not value.sharding.is_fully_replicated
    assert all(s.data.size < value.size for s in value.addressable_shards)
    return value.sharding.spec


@pytest.mark.parametrize("name", DENSE + MOE)
def test_sharded_load_matches_single_device(hf_zoo, name):
    path, _ = hf_zoo(name)
    mesh = make_mesh(MOE_MESH if name in MOE else DENSE_MESH)
    model = load_pretrained(path, mesh=mesh)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    q = attn.qkv_proj if model.config.fused_qkv else attn.q_proj
    if name in MOE:
        assert _split(q.weight) == P("tensor", None)
        assert _split(mlp.experts.gate_up_proj) == P("expert", "tensor", None)
        assert _split(mlp.experts.down_proj) == P("expert", None, "tensor")
        assert _split(mlp.gate.weight) == P("expert", None)
    else:
        assert _split(q.weight) == P("tensor", "fsdp")
        assert _split(mlp.down_proj.weight) == P("fsdp", "tensor")
    ids = _ids()
    # fp32 sums split over shards add in another order: 1e-5 relative (Gemma 3's reach ~1.1e-5 absolute).
    np.testing.assert_allclose(_logits(model, ids, mesh), _logits(load_pretrained(path), ids), rtol=1e-5, atol=1e-5)


def _lora_grads(path, mesh, lora: LoraConfig):
    """Loss and LoRA gradients of one jitted step on `mesh`, from non-zero adapters (PEFT's B = 0 would leave
    every A gradient zero) drawn the same on any mesh."""
    model = apply_lora(load_pretrained(path, mesh=mesh), lora)
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))
    for i, (_, var) in enumerate(nnx.to_flat_state(trainable)):
        value = 0.1 * jax.random.normal(jax.random.key(i), var.shape, var.dtype)
        var.set_value(jax.device_put(value, var[...].sharding))
    fn = jax.jit(functools.partial(loss_and_grads, mesh=mesh), static_argnums=0)
    grads, (loss, *_) = fn(graphdef, trainable, frozen, shard_batch(_batch(), mesh), jax.random.key(0))
    return float(loss), grads, trainable


@pytest.mark.parametrize("name,shape,lora", [
    # The fused projections: each adapter's B spans q, k and v (gate and up) split over `tensor`.
    ("phi3", {"data": 2, "fsdp": 2, "tensor": 2},
     LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("qkv_proj", "gate_up_proj"))),
    ("qwen3_moe", {"fsdp": 2, "expert": 2, "tensor": 2},
     LoraConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj",),
                target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))),
], ids=["phi3", "qwen3_moe"])
def test_lora_step_on_eight_devices_equals_one(hf_zoo, name, shape, lora):
    path, _ = hf_zoo(name)
    loss1, g1, _ = _lora_grads(path, make_mesh({"data": 1}, jax.devices()[:1]), lora)
    loss8, g8, params8 = _lora_grads(path, make_mesh(shape), lora)
    assert abs(loss1 - loss8) <= 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), g1, g8)
    assert max(jax.tree.leaves(diffs)) <= 1e-5
    assert min(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g8)) > 0
    layer = params8["layers"][0]
    if name == "qwen3_moe":
        # PEFT's expert factors ([r·E, in], [out, r·E]) split their r·E axis over `expert` like the weights.
        assert _split(layer["mlp"]["experts"]["gate_up_proj_lora_A"]) == P("expert", "fsdp")
        assert _split(layer["mlp"]["experts"]["gate_up_proj_lora_B"]) == P("tensor", "expert")
    else:
        assert _split(layer["self_attn"]["qkv_proj"]["lora_B"]) == P("tensor", None)
