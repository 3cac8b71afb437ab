"""LoRA: exact no-op at init, only adapters train, PEFT-identical targeting and counts, fp32 merge, freezing."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtune import load_pretrained
from jaxtune.lora.peft import lora_config_from_peft
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.lora.apply import apply_lora, lora_sites, merge_lora, merged_weight, resolve_targets
from jaxtune.train.optim import decay_mask
from jaxtune.train.partition import param_report, split_trainable, trainable_filter
from jaxtune.model.sharding import make_mesh
from jaxtune.train.loss import sequence_nll
from jaxtune.train.optim import OptimConfig, make_optimizer

LAYOUTS = [False, True]


def _ids(vocab, shape=(2, 16), seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def randomize_b(model, std=0.1, seed=0):
    """Non-zero B, so the adapters change the output (PEFT's init leaves B = 0)."""
    for i, (_, lin, _) in enumerate({id(lin): (n, lin, l) for n, lin, l in lora_sites(model)}.values()):
        lin.lora_B.set_value(std * jax.random.normal(jax.random.key(seed * 1000 + i), lin.lora_B.shape))
    return model


def flat(state):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def llama(hf_zoo):
    return hf_zoo("llama_gqa")


@pytest.mark.parametrize("scan", LAYOUTS)
def test_zero_b_is_exact_noop_with_peft_init(llama, scan):
    path, _ = llama
    model = load_pretrained(path, dtype=jnp.float32, param_dtype=jnp.bfloat16, scan_layers=scan)
    ids = _ids(128)
    base = np.asarray(model(ids))
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    assert np.array_equal(np.asarray(model(ids)), base)
    q = model.layers.self_attn.q_proj if scan else model.layers[0].self_attn.q_proj
    a, b = q.lora_A[...], q.lora_B[...]
    lead = (2,) if scan else ()
    assert a.shape == (*lead, 4, 64) and b.shape == (*lead, 64, 4)
    assert a.dtype == b.dtype == jnp.float32 and q.weight.dtype == jnp.bfloat16
    assert isinstance(q.lora_A, nnx.LoRAParam) and q.lora_scale == 2.0
    assert not np.any(np.asarray(b))
    bound = 1 / np.sqrt(64)  # kaiming_uniform(a=√5): U(±1/√fan_in)
    assert np.abs(np.asarray(a)).max() <= bound and np.abs(np.asarray(a)).max() > 0.9 * bound
    want = ("layers",) * scan + ("lora_rank", "embed"), ("layers",) * scan + ("q_heads", "lora_rank")
    assert (q.lora_A.axes, q.lora_B.axes) == want
    with pytest.raises(LoraConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig(rank=4))


def test_sgd_step_changes_only_adapters_and_optimizer_state_is_adapter_sized(llama):
    path, _ = llama
    model = apply_lora(load_pretrained(path), LoraConfig(rank=4, alpha=8, dropout=0.0))
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))
    ids = _ids(128)
    mask = jnp.ones(ids.shape, jnp.int32)

    def loss(t):
        nll, _, n = sequence_nll(nnx.merge(graphdef, t, frozen), ids[:, :-1], ids[:, 1:], mask[:, 1:])
        return nll / n

    grads = jax.jit(jax.grad(loss))(trainable)
    opt = make_optimizer(OptimConfig(name="sgd", lr=0.5, max_grad_norm=0.0), total_steps=10, params=trainable)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    stepped = nnx.merge(graphdef, optax.apply_updates(trainable, updates), frozen)

    before, after = flat(nnx.state(model, nnx.Param)), flat(nnx.state(stepped, nnx.Param))
    g = flat(grads)
    assert before.keys() == after.keys()
    for k in before:
        if k.endswith("lora_B"):
            assert np.abs(after[k] - before[k]).max() > 0, k
            np.testing.assert_array_equal(after[k], before[k] - np.float32(0.5) * g[k])
        elif k.endswith("lora_A"):  # B = 0 ⇒ dL/dA = 0 at the first step, exactly as in PEFT
            np.testing.assert_array_equal(after[k], before[k])
        else:
            assert after[k].tobytes() == before[k].tobytes(), k

    adam = make_optimizer(OptimConfig(name="adamw", weight_decay=0.1), total_steps=10)
    leaves = jax.tree.leaves(adam.init(trainable))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    smallest_base = min(x.size for x in jax.tree.leaves(frozen) if x.ndim == 2)
    assert max(x.size for x in leaves) < smallest_base
    assert sum(x.size for x in leaves) == 2 * n_trainable + sum(x.size for x in leaves if x.ndim == 0)


@pytest.mark.parametrize("scan", LAYOUTS)
def test_merge_matches_adapters_fp32(llama, scan):
    path, _ = llama
    model = randomize_b(apply_lora(load_pretrained(path, scan_layers=scan), LoraConfig(rank=4, alpha=8)))
    ids = _ids(128)
    with_adapters = np.asarray(model(ids))
    merged = merge_lora(model)
    assert np.abs(np.asarray(merged(ids)) - with_adapters).max() <= 1e-5
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam)) and merged.lora_config is None
    assert model.lora_config is not None and jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # input untouched
    q_in, q_out = (m.layers.self_attn.q_proj if scan else m.layers[0].self_attn.q_proj for m in (model, merged))
    assert np.abs(np.asarray(q_out.weight[...] - q_in.weight[...])).max() > 1e-2  # the merge is not vacuous


def test_merge_with_bf16_base_casts_once(llama):
    """A bf16 base cannot hold W + ΔW exactly; the merge rounds once, from the fp32 sum. Tolerance: merged
    bf16 logits within 2% of the largest |logit| of adapter-on-base (measured ≈0.7% on this model)."""
    path, _ = llama
    model = load_pretrained(path, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    randomize_b(apply_lora(model, LoraConfig(rank=8, alpha=16)))
    q = model.layers[1].self_attn.q_proj
    w, a, b = q.weight[...], q.lora_A[...], q.lora_B[...]
    merged = merge_lora(model)
    ref = (np.asarray(w, np.float32) + q.lora_scale * (np.asarray(b) @ np.asarray(a))).astype(jnp.bfloat16)
    got = merged.layers[1].self_attn.q_proj.weight[...]
    assert got.dtype == jnp.bfloat16 and np.array_equal(np.asarray(got), ref)
    naive = (w + (b.astype(jnp.bfloat16) @ a.astype(jnp.bfloat16)) * jnp.bfloat16(q.lora_scale))
    assert not np.array_equal(np.asarray(naive), ref)  # bf16 math would round differently
    np.testing.assert_array_equal(np.asarray(merged_weight(w, a, b, q.lora_scale)), ref)
    ids = _ids(128)
    on_base, after = np.asarray(model(ids)), np.asarray(merged(ids))
    assert np.abs(after - on_base).max() <= 0.02 * np.abs(on_base).max()


# PEFT adapter_config fragments whose targeting we must reproduce module for module.
PEFT_TARGETING = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear"),
    dict(target_modules=r".*\.mlp\.(up|down)_proj"),
    dict(target_modules=["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.gate_proj"]),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], layers_to_transform=[1],
         exclude_modules=["model.layers.1.self_attn.k_proj"]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules="all-linear", exclude_modules=r"model\.layers\.0\..*"),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
         rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"o_proj": 3}),
]


@pytest.mark.parametrize("peft_kw", PEFT_TARGETING, ids=range(len(PEFT_TARGETING)))
def test_targets_resolve_like_peft(llama, peft_kw):
    import peft

    path, hf = llama
    kw = {"r": 4, "lora_alpha": 8, **peft_kw}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    want = {name: (mod.r["default"], float(mod.lora_alpha["default"]))
            for name, mod in pm.base_model.model.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)}
    cfg = lora_config_from_peft({"peft_type": "LORA", **kw})
    for scan in LAYOUTS:
        model = load_pretrained(path, scan_layers=scan)
        assert resolve_targets(cfg, model) == want


def test_bad_targets_fail_clearly(llama):
    path, _ = llama
    model = load_pretrained(path)
    with pytest.raises(LoraConfigError, match="'qproj' matches no linear layer"):
        apply_lora(model, LoraConfig(target_modules=["qproj"]))
    with pytest.raises(LoraConfigError, match="lm_head"):
        apply_lora(model, LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(LoraConfigError, match="not a linear layer"):
        apply_lora(model, LoraConfig(target_modules=r"model\.layers\.\d+\.self_attn"))
    with pytest.raises(LoraConfigError, match="selects no linear layer"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(LoraConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    assert getattr(model, "lora_config", None) is None
    scanned = load_pretrained(path, scan_layers=True)
    with pytest.raises(LoraConfigError, match="scan_layers=False"):
        apply_lora(scanned, LoraConfig(rank=4, rank_pattern={"layers.0.self_attn.q_proj": 2}))


@pytest.mark.parametrize("scan", LAYOUTS)
def test_layers_outside_transform_stay_zero_in_stacked_layout(llama, scan):
    path, _ = llama
    model = apply_lora(load_pretrained(path, scan_layers=scan),
                       LoraConfig(rank=4, target_modules=["q_proj"], layers_to_transform=[1]))
    names = [n for n, _, _ in lora_sites(model)]
    assert names == ["model.layers.1.self_attn.q_proj"]
    if scan:
        a = np.asarray(model.layers.self_attn.q_proj.lora_A[...])
        assert not np.any(a[0]) and np.any(a[1])
    else:
        assert model.layers[0].self_attn.q_proj.lora_A is None


def test_full_finetune_selection_and_freeze(llama):
    path, _ = llama
    model = load_pretrained(path)
    _, trainable, frozen = split_trainable(model, trainable_filter("full", ["embed_tokens", "layers.0"]))
    names = set(flat(trainable))
    assert "lm_head/weight" in names and "layers/1/self_attn/q_proj/weight" in names and "norm/weight" in names
    assert not any(n.startswith(("embed_tokens", "layers/0/")) for n in names)
    assert set(flat(frozen)) == {n for n in flat(nnx.state(model)) if n not in names}
    _, everything, rest = split_trainable(model, trainable_filter("full"))
    assert len(flat(everything)) == len(flat(nnx.state(model, nnx.Param))) and not jax.tree.leaves(rest)
    with pytest.raises(ValueError, match="'embed' matches no parameter"):
        split_trainable(model, trainable_filter("full", ["embed"]))
    with pytest.raises(ValueError, match="mode 'full' only"):
        trainable_filter("lora", ["embed_tokens"])
    with pytest.raises(ValueError, match="apply_lora"):
        split_trainable(model, trainable_filter("lora"))


@pytest.mark.parametrize("scan", LAYOUTS)
def test_decay_mask_excludes_norms_biases_embeddings(hf_zoo, scan):
    path, _ = hf_zoo("qwen2_bias")
    model = apply_lora(load_pretrained(path, scan_layers=scan), LoraConfig(rank=2))
    _, params, _ = split_trainable(model, trainable_filter("full"))
    mask = flat(decay_mask(params))
    no_decay = {k for k, v in mask.items() if not v}
    assert {k for k in mask if "norm" in k or k.endswith("bias") or k.startswith("embed_tokens")} == no_decay
    assert mask["lm_head/weight"] and any(k.endswith("lora_A") and v for k, v in mask.items())


def test_lora_params_follow_base_sharding(llama):
    path, _ = llama
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = apply_lora(load_pretrained(path, mesh=mesh), LoraConfig(rank=4))
    q = model.layers[0].self_attn.q_proj
    assert q.lora_A[...].sharding.spec == P(None, "fsdp")
    assert q.lora_B[...].sharding.spec == P("tensor", None)


@pytest.mark.parametrize("name,targets", [("llama_gqa", "all-linear"), ("qwen3", ["q_proj", "v_proj"])])
def test_param_report_matches_peft(hf_zoo, name, targets):
    import peft

    from jaxtune.hf.load import load_config

    path, hf = hf_zoo(name)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                 task_type="CAUSAL_LM"))
    trainable, total = pm.get_nb_trainable_parameters()
    rep = param_report(load_config(path), LoraConfig(rank=16, alpha=32, target_modules=targets))
    assert (rep.lora_params, rep.base_params + rep.lora_params) == (trainable, total)
    assert rep.lora_fraction == pytest.approx(trainable / total)
    # bf16 base, fp32 adapters, AdamW: 2 fp32 moments per trainable parameter (+ a step counter).
    assert rep.lora_memory["grads"] == 4 * trainable
    assert rep.lora_memory["weights"] == 2 * rep.base_params + 4 * trainable
    assert rep.full_memory["grads"] == 2 * rep.base_params
    assert 2 * rep.full_memory["grads"] <= rep.full_memory["optimizer"] <= 2 * rep.full_memory["grads"] + 16


def test_param_report_at_real_scale():
    """Llama-3.2-1B shapes (abstract, nothing allocated): rank-16 all-linear LoRA trains 0.1–1% of the
    parameters and needs far less training memory than full fine-tuning."""
    from jaxtune.model.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      tie_word_embeddings=True)
    rep = param_report(cfg, LoraConfig(rank=16, alpha=32))
    assert rep.base_params == cfg.num_params()
    per_layer = 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))
    assert rep.lora_params == 16 * per_layer and 0.001 < rep.lora_fraction < 0.01
    assert rep.lora_memory["total"] < 0.3 * rep.full_memory["total"]


def test_merge_rule_picks_only_tiny_layers():
    from jaxtune.lora.apply import merge_is_cheaper

    assert merge_is_cheaper(64, 172, 8) and merge_is_cheaper(64, 64, 8)  # stories260K
    assert not merge_is_cheaper(576, 1536, 16)  # SmolLM-135M: ratio 26
    assert not merge_is_cheaper(4096, 14336, 16) and not merge_is_cheaper(2048, 2048, 64)


@pytest.mark.parametrize("scan", LAYOUTS)
def test_merged_forward_matches_factored(llama, scan):
    """The on-the-fly merged form `x (W + s·B·A)ᵀ` and the factored `x Wᵀ + s·(x Aᵀ) Bᵀ` give the same loss
    and adapter gradients (apply_lora gives the tiny zoo's layers the merged form; clearing
    `lora_merged_forward` forces the factored one)."""
    path, _ = llama
    model = randomize_b(apply_lora(load_pretrained(path, scan_layers=scan), LoraConfig(rank=8, alpha=16), rngs=1))
    assert all(lin.lora_merged_forward for _, lin, _ in lora_sites(model))
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))
    ids = _ids(128, (2, 24))

    mask = jnp.ones(ids.shape, jnp.float32)

    def loss(params):
        nll, _, n = sequence_nll(nnx.merge(graphdef, params, frozen), ids, jnp.roll(ids, -1, axis=1), mask)
        return nll / n

    merged = jax.value_and_grad(loss)(trainable)
    for _, lin, _ in lora_sites(model):
        lin.lora_merged_forward = False
    graphdef, trainable, frozen = split_trainable(model, trainable_filter("lora"))  # the flag is in the graphdef
    factored = jax.value_and_grad(loss)(trainable)
    np.testing.assert_allclose(merged[0], factored[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(merged[1]), jax.tree.leaves(factored[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
