"""The jitted SFT step: memorisation, exact gradient accumulation, NaN guard, mixed precision, remat/scan
parity, and one compilation for a whole epoch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.lora.config import LoraConfig
from jaxtune.lora.apply import apply_lora
from jaxtune.train.partition import split_trainable, trainable_filter
from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import Transformer
from jaxtune.train.optim import OptimConfig, make_optimizer
from jaxtune.train.step import jit_eval_step, jit_train_step, loss_and_grads

CFG = ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# For memorisation: a frozen head at init scale (std 0.02) cannot reach the logit margins a loss < 0.05
# needs, so the weights get a pretrained-like scale (std 0.2) and the head one row per hidden dimension.
OVERFIT_CFG = CFG.replace(vocab_size=64, hidden_size=64, intermediate_size=128)


def _rows(lengths, t: int, seed: int = 0, vocab: int = CFG.vocab_size) -> dict:
    """One right-padded example per row with the given lengths; the first token of each is prompt (mask 0)."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    ids = rng.integers(1, vocab, (n, t + 1)).astype(np.int32)
    seg = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    mask = seg.copy()
    mask[:, 0] = 0
    return {"input_ids": ids[:, :-1] * seg, "targets": ids[:, 1:] * seg, "loss_mask": mask, "segment_ids": seg,
            "positions": np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)}


def _model(mode: str, dtype=jnp.float32, param_dtype=None, cfg: ModelConfig = CFG, init_scale: float = 1.0,
           **runtime):
    model = Transformer(cfg.replace(**runtime), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    if init_scale != 1.0:
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if var.ndim == 2:
                var.set_value(var[...] * init_scale)
    if mode == "lora":
        apply_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.0), nnx.Rngs(1))
    return split_trainable(model, trainable_filter(mode))


def _train(mode: str, batch: dict, steps: int, lr: float, **model_kw):
    graphdef, trainable, frozen = _model(mode, **model_kw)
    tx = make_optimizer(OptimConfig(lr=lr, schedule="constant", max_grad_norm=1.0), steps, trainable)
    opt_state = tx.init(trainable)
    step = jit_train_step(tx)
    for i in range(steps):
        trainable, opt_state, m = step(graphdef, trainable, frozen, opt_state, batch, jax.random.key(i))
    return trainable, m, step


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_overfits_a_few_examples(mode):
    batch = _rows([16, 12, 9, 16], 16, vocab=OVERFIT_CFG.vocab_size)
    _, m, step = _train(mode, batch, 80, 1e-2, cfg=OVERFIT_CFG, init_scale=10.0)
    assert float(m["loss"]) < 0.05
    assert float(m["accuracy"]) == 1.0
    assert step._cache_size() == 1


def test_gradient_accumulation_equals_one_big_batch():
    # Two micro-batches with very different token counts: long rows first, then short ones.
    batch = _rows([16, 16, 15, 14, 3, 2, 4, 2], 16, seed=1)
    graphdef, params, frozen = _model("full")
    fn = jax.jit(loss_and_grads, static_argnums=0)
    full_g, (full_loss, *_r) = fn(graphdef, params, frozen, batch, jax.random.key(0))
    micro = {name: v.reshape(2, 4, 16) for name, v in batch.items()}
    g, (loss, *_r) = fn(graphdef, params, frozen, micro, jax.random.key(0))
    assert abs(float(loss) - float(full_loss)) <= 1e-5
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, full_g))) <= 1e-5
    # The naive mean of per-micro-batch means is a different number: the test can tell them apart.
    naive = np.mean([float(fn(graphdef, params, frozen, {n: v[i] for n, v in micro.items()}, jax.random.key(0))[1][0])
                     for i in range(2)])
    assert abs(naive - float(full_loss)) > 1e-3


def test_chunked_cross_entropy_matches_full_logits():
    batch = _rows([16, 11, 7, 16], 16, seed=2)
    graphdef, params, frozen = _model("full")
    ref_g, (ref_loss, *_r) = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, frozen, batch,
                                                                        jax.random.key(0))
    fn = jax.jit(functools.partial(loss_and_grads, loss_chunk=4), static_argnums=0)
    g, (loss, *_r) = fn(graphdef, params, frozen, batch, jax.random.key(0))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, ref_g))) <= 1e-5


def test_loss_sums_match_optax_and_argmax():
    """The fused sums: NLL and its gradient as optax's cross-entropy, correct = argmax hits, and a target
    tied with the maximum counts as correct."""
    import optax

    from jaxtune.train.loss import _chunk_sums

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 7, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 7)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (3, 7)), jnp.int32)
    ref = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * mask)  # noqa: E731
    nll, correct = _chunk_sums(logits, targets, mask)
    np.testing.assert_allclose(nll, ref(logits), rtol=1e-6)
    assert float(correct) == float(jnp.sum((jnp.argmax(logits, -1) == targets) * mask)) > 0
    np.testing.assert_allclose(jax.grad(lambda x: _chunk_sums(x, targets, mask)[0])(logits), jax.grad(ref)(logits),
                               atol=1e-6)
    tied = jnp.zeros((1, 1, 4)).at[0, 0, jnp.array([1, 3])].set(2.0)
    assert float(_chunk_sums(tied, jnp.array([[3]]), jnp.ones((1, 1)))[1]) == 1.0


def test_non_finite_step_changes_nothing():
    graphdef, trainable, frozen = _model("lora")
    tx = make_optimizer(OptimConfig(lr=1e-2), 10, trainable)
    opt_state = tx.init(trainable)
    step = jit_train_step(tx)
    good = _rows([16, 9], 16)
    trainable, opt_state, _ = step(graphdef, trainable, frozen, opt_state, good, jax.random.key(0))
    bad = dict(good, targets=np.full_like(good["targets"], CFG.vocab_size))  # ids past the vocab: NaN loss
    before = jax.tree.map(np.asarray, (trainable, opt_state))
    trainable, opt_state, m = step(graphdef, trainable, frozen, opt_state, bad, jax.random.key(1))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, (trainable, opt_state))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    trainable, opt_state, m = step(graphdef, trainable, frozen, opt_state, good, jax.random.key(2))
    assert bool(m["finite"])
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before[0]),
                                                                   jax.tree.leaves(trainable)))


def test_bf16_full_finetune_keeps_fp32_master_weights():
    batch = _rows([16, 13], 16)
    trainable, m, _ = _train("full", batch, 2, 1e-3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
    assert abs(float(m["loss"]) - np.log(CFG.vocab_size)) < 0.1  # bf16 activations, fp32 loss, near-uniform init
    graphdef, lora, frozen = _model("lora", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}


def _layer_leaf(state, i, path):
    node = state["layers"][i]
    for name in path[1:]:
        node = node[name]
    return node[...]


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_scanned_and_rematerialised_layers_give_the_same_gradients(remat):
    batch = _rows([16, 10, 5, 16], 16, seed=3)
    fn = jax.jit(loss_and_grads, static_argnums=0)
    graphdef, params, frozen = _model("full")
    ref_g, (ref_loss, *_r) = fn(graphdef, params, frozen, batch, jax.random.key(0))
    s_graphdef, s_params, s_frozen = _model("full", scan_layers=True, remat=remat)
    for path, var in nnx.to_flat_state(s_params):  # the same weights, stacked on a leading layer axis
        var.set_value(jnp.stack([_layer_leaf(params, i, path) for i in range(CFG.num_hidden_layers)])
                      if path[0] == "layers" else params[path[0]][path[1]][...])
    g, (loss, *_r) = fn(s_graphdef, s_params, s_frozen, batch, jax.random.key(0))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    for path, leaf in nnx.to_flat_state(g):
        ref = (jnp.stack([_layer_leaf(ref_g, i, path) for i in range(CFG.num_hidden_layers)])
               if path[0] == "layers" else ref_g[path[0]][path[1]][...])
        assert float(jnp.abs(leaf[...] - ref).max()) <= 1e-5, path


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_rematerialised_unrolled_layers_give_the_same_gradients(mode, remat):
    """Remat without scan: each layer is checkpointed on its own split state (rematerialising the module itself
    failed to trace under the step's grad when frozen weights were closed over, i.e. with LoRA)."""
    batch = _rows([16, 10, 5, 16], 16, seed=4)
    fn = jax.jit(loss_and_grads, static_argnums=0)
    graphdef, params, frozen = _model(mode)
    r_graphdef, r_params, r_frozen = _model(mode, remat=remat)
    ref_g, (ref_loss, *_r) = fn(graphdef, params, frozen, batch, jax.random.key(0))
    g, (loss, *_r) = fn(r_graphdef, r_params, r_frozen, batch, jax.random.key(0))
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    for (path, leaf), (_, ref) in zip(nnx.to_flat_state(g), nnx.to_flat_state(ref_g)):
        assert float(jnp.abs(leaf[...] - ref[...]).max()) <= 1e-6, path


def test_one_compilation_for_a_whole_epoch_with_a_padded_last_batch():
    from jaxtune.data.loader import make_loader

    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(4, 30, 37):
        ids = rng.integers(1, CFG.vocab_size, n + 1).astype(np.int32)
        examples.append({"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": np.ones(n, np.int32)})
    loader = make_loader(examples, batch_size=4, seq_len=32, packing=False)  # 37 rows: 9 full batches + 1
    graphdef, trainable, frozen = _model("lora")
    tx = make_optimizer(OptimConfig(lr=1e-3), loader.total_steps, trainable)
    opt_state = tx.init(trainable)
    step, evaluate = jit_train_step(tx), jit_eval_step()
    batches = list(loader)
    assert len(batches) == loader.total_steps > 2
    last = batches[-1]
    assert last["input_ids"].shape == batches[0]["input_ids"].shape
    assert (last["segment_ids"].sum(axis=1) == 0).any()  # a short last batch, topped up with padding rows
    for i, batch in enumerate(batches):
        trainable, opt_state, m = step(graphdef, trainable, frozen, opt_state, batch, jax.random.key(i))
        evaluate(graphdef, trainable, frozen, batch)
    assert np.isfinite(float(m["loss"]))
    assert step._cache_size() == 1
    assert evaluate._cache_size() == 1
