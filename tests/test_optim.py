"""Optimizer config, schedules, masked weight decay, clipping, and exact gradient accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.lora.config import LoraConfig
from jaxtune.lora.apply import apply_lora
from jaxtune.train.partition import split_trainable, trainable_filter
from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import Transformer
from jaxtune.train.loss import token_loss_sums
from jaxtune.train.optim import OptimConfig, accumulate_grads, lr_schedule, make_optimizer


def _params():
    """A pytree named like the model: decayed matrices next to a norm, a bias and the embedding."""
    k = jax.random.split(jax.random.key(0), 4)
    return {"embed_tokens": {"weight": jax.random.normal(k[0], (8, 4))},
            "layers": {"0": {"q_proj": {"weight": jax.random.normal(k[1], (4, 4)),
                                        "bias": jax.random.normal(k[2], (4,))},
                             "input_layernorm": {"weight": jnp.ones((4,))}}},
            "lm_head": {"weight": jax.random.normal(k[3], (8, 4))}}


@pytest.mark.parametrize("field,value,msg", [
    ("name", "adam", "optim.name='adam'"), ("lr", 0.0, "optim.lr=0.0: must be > 0"),
    ("schedule", "step", "optim.schedule"), ("b2", 1.0, "optim.b2"), ("grad_accum_steps", 0, "optim.grad_accum"),
    ("warmup_steps", 2.5, "optim.warmup_steps=2.5: must be an integer"), ("max_grad_norm", -1.0, "optim.max_grad"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        OptimConfig(**{field: value})


def test_schedules_warm_up_then_decay_to_min_ratio():
    lr, total, warm = 1e-3, 110, 10
    cos = lr_schedule(OptimConfig(lr=lr, warmup_steps=warm, schedule="cosine", min_lr_ratio=0.1), total)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(lr / 2) and float(cos(warm)) == pytest.approx(lr)
    mid = 0.1 * lr + (lr - 0.1 * lr) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert float(cos(warm + 50)) == pytest.approx(mid, rel=1e-5)
    assert float(cos(total)) == pytest.approx(0.1 * lr, rel=1e-5)
    lin = lr_schedule(OptimConfig(lr=lr, warmup_steps=warm, schedule="linear"), total)
    assert float(lin(warm + 25)) == pytest.approx(0.75 * lr, rel=1e-5) and float(lin(total)) == 0.0
    const = lr_schedule(OptimConfig(lr=lr, schedule="constant"), total)
    assert float(const(0)) == float(const(total)) == pytest.approx(lr)
    with pytest.raises(ValueError, match="warmup_steps=200 exceeds"):
        lr_schedule(OptimConfig(warmup_steps=200), total)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_weight_decay_skips_norms_biases_embeddings(name):
    params = _params()
    opt = make_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.5, max_grad_norm=0.0), 10, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    state = opt.init(params)
    for _ in range(2):  # step 0 of warmup-free schedules already has lr > 0
        updates, state = opt.update(zero, state, params)
    new = optax.apply_updates(params, updates)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
    assert moved["layers"]["0"]["q_proj"]["weight"] and moved["lm_head"]["weight"]
    assert not moved["layers"]["0"]["q_proj"]["bias"] and not moved["embed_tokens"]["weight"]
    assert not moved["layers"]["0"]["input_layernorm"]["weight"]


def test_clipping_bounds_the_global_norm():
    params = _params()
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    opt = make_optimizer(OptimConfig(name="sgd", lr=1.0, max_grad_norm=2.0, schedule="constant"), 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(2.0, rel=1e-5)


def test_empty_trainable_partition_is_refused():
    with pytest.raises(ValueError, match="trainable partition is empty"):
        make_optimizer(OptimConfig(), 10, {})


def _batch(lengths, seq_len, seed):
    """Rows of very different loss-token counts (the rest is padding: segment 0, mask 0)."""
    rng = np.random.RandomState(seed)
    n = len(lengths)
    ids = rng.randint(1, 64, (n, seq_len)).astype(np.int32)
    real = np.arange(seq_len)[None] < np.asarray(lengths)[:, None]
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": real.astype(np.int32),
            "segment_ids": real.astype(np.int32)}


def test_accumulation_equals_one_big_batch_whatever_the_lengths():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=4, dropout=0.0))
    linears = [n for _, n in nnx.iter_graph(model) if getattr(n, "lora_B", None) is not None]
    for i, lin in enumerate(linears):
        lin.lora_B.set_value(0.05 * jax.random.normal(jax.random.key(i), lin.lora_B.shape))
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))

    def loss_sums(t, b):
        m = nnx.merge(graphdef, t, frozen)
        nll, correct, n = token_loss_sums(m, m.hidden_states(b["input_ids"], b["segment_ids"]), b["targets"],
                                          b["loss_mask"])
        return nll, n, {"correct": correct}

    k, per = 4, 2
    big = _batch([24, 2, 3, 24, 1, 20, 4, 2], 24, seed=1)
    micro = jax.tree.map(lambda x: jnp.asarray(x.reshape(k, per, *x.shape[1:])), big)
    whole = jax.tree.map(lambda x: jnp.asarray(x[None]), big)
    loss_k, grads_k, n_k, m_k = jax.jit(accumulate_grads, static_argnums=0)(loss_sums, trainable, micro)
    loss_1, grads_1, n_1, m_1 = jax.jit(accumulate_grads, static_argnums=0)(loss_sums, trainable, whole)
    assert float(n_k) == float(n_1) == 80.0 and float(m_k["correct"]) == float(m_1["correct"])
    assert float(loss_k) == pytest.approx(float(loss_1), abs=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_1))
    assert scale > 1e-2
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1)):  # fp32 summation-order noise only
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(scale, 1.0)
    # optax.MultiSteps averages per-micro-batch mean gradients: measurably different with these lengths.
    mean_grad = jax.jit(jax.grad(lambda t, b: loss_sums(t, b)[0] / b["loss_mask"].sum()))
    per_micro = [mean_grad(trainable, jax.tree.map(lambda x: x[i], micro)) for i in range(k)]
    multisteps = jax.tree.map(lambda *g: sum(g) / k, *per_micro)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(multisteps), jax.tree.leaves(grads_1)))
    assert gap > 0.05 * scale
