"""LoRA on MoE expert tensors (PEFT's `target_parameters`) end to end: our adapter in `peft`, peft's adapter in
jaxtune, both layouts, merged export into transformers, merging, SGD steps that move adapters only, and the refusals."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_models import torch_logits
from test_config import BASE
from test_export import _ids, tensors

from jaxtune import load_pretrained
from jaxtune.export import save_merged
from jaxtune.lora.apply import apply_lora, expert_lora_sites, lora_sites, merge_lora, resolve_targets
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.lora.peft import load_peft_adapter, save_peft_adapter

ATOL = 1e-4
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Mixtral in the scanned layout (every layer MoE), Qwen3-MoE per layer (its dense layer 1 cannot be scanned).
CASES = [("mixtral", False), ("qwen3_moe", True)]  # qwen3_moe scanned: its MoE and dense layers in two stacks
CASE_IDS = ["mixtral-layers", "qwen3_moe-scan"]
PREFIX = "base_model.model.model.layers"


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logits(model, ids):
    """Jitted: one compile per model structure, where eager runs of the scanned layout retrace every call."""
    return np.asarray(_forward(model, jnp.asarray(ids)))


def randomize_b(model, std=0.1):
    """Non-zero B on every Linear and expert adapter (PEFT's init leaves B = 0, which would make parity trivial)."""
    leaves = {id(lin.lora_B): lin.lora_B for _, lin, _ in lora_sites(model)}
    leaves.update({id(v): v for _, experts, param, _ in expert_lora_sites(model)
                   for v in [getattr(experts, f"{param}_lora_B")]})
    rng = np.random.default_rng(0)
    for var in leaves.values():
        var.set_value(jnp.asarray(std * rng.standard_normal(var.shape), jnp.float32))
    return model


def lora_model(path, scan, **kw):
    cfg = LoraConfig(**{"rank": 2, "alpha": 3.0, "dropout": 0.0, "target_modules": ATTENTION,
                        "target_parameters": EXPERTS, **kw})
    return randomize_b(apply_lora(load_pretrained(path, scan_layers=scan), cfg))


@pytest.mark.parametrize("family,scan", CASES, ids=CASE_IDS)
def test_adapter_round_trips_and_merged_export(hf_zoo, tmp_path, family, scan):
    import peft
    from transformers import AutoModelForCausalLM

    path, hf = hf_zoo(family)
    model = lora_model(path, scan, rslora=True)
    ids = _ids()
    ours = _logits(model, ids)
    assert np.abs(ours - torch_logits(hf, ids)).max() > 1e-2

    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == EXPERTS and cfg["target_modules"] == ATTENTION and cfg["lora_dropout"] == 0
    shapes = {k: v.shape for k, v in tensors(out).items()}
    assert shapes[f"{PREFIX}.0.mlp.experts.base_layer.lora_A.weight"] == (2 * 4, 64)  # gate_up_proj: [r·E, H]
    assert shapes[f"{PREFIX}.0.mlp.experts.base_layer.lora_B.weight"] == (64, 2 * 4)  # [2I, r·E]
    assert shapes[f"{PREFIX}.0.mlp.experts.lora_A.weight"] == (2 * 4, 32)  # down_proj: [r·E, I]
    assert shapes[f"{PREFIX}.0.mlp.experts.lora_B.weight"] == (64, 2 * 4)  # [H, r·E]
    moe_layers = [i for i, m in enumerate(model.config.moe_layers) if m]
    assert len(shapes) == 8 * model.config.num_hidden_layers + 4 * len(moe_layers)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out)
    assert np.abs(torch_logits(pm, ids) - ours).max() <= ATOL
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".experts." in name and "lora_B" in name:
                p.zero_()
    assert np.abs(torch_logits(pm, ids) - ours).max() > 1e-3  # the expert adapters matter on their own

    other = not scan if family == "mixtral" else scan
    back = load_peft_adapter(load_pretrained(path, scan_layers=other), out)
    assert np.abs(_logits(back, ids) - ours).max() <= 1e-5

    merged = save_merged(model, None, tmp_path / "merged", source_dir=path)
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(merged), ids) - ours).max() <= ATOL
    folded = merge_lora(model)
    assert not jax.tree.leaves(nnx.state(folded, nnx.LoRAParam)) and folded.lora_config is None
    for adapted, plain in zip(_experts(model), _experts(folded)):
        for param in ("gate_up_proj", "down_proj"):  # the weight the adapted forward uses, now the base weight
            np.testing.assert_allclose(np.asarray(getattr(plain, param)[...]), np.asarray(adapted.weight(param)),
                                       atol=1e-6)
            assert np.abs(np.asarray(getattr(plain, param)[...] - getattr(adapted, param)[...])).max() > 1e-3


# Per family: the expert tensors peft targets (qwen3_moe: only gate_up_proj, so its keys carry no `base_layer.`,
# named by a bare suffix) and a rank pattern on an expert tensor.
PEFT_MADE = {
    "mixtral": {"target_parameters": EXPERTS, "rank_pattern": {"experts.down_proj": 3}, "alpha_pattern": {
        "gate_up_proj": 5}},
    "qwen3_moe": {"target_parameters": ["gate_up_proj"], "use_rslora": True},
}


@pytest.mark.parametrize("family,scan", CASES, ids=CASE_IDS)
def test_peft_made_adapter_loads_in_jaxtune(hf_zoo, tmp_path, family, scan):
    import peft

    path, hf = hf_zoo(family)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                             **copy.deepcopy(PEFT_MADE[family]))
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    pm.save_pretrained(tmp_path / "adapter")
    shapes = {k: v.shape for k, v in tensors(tmp_path / "adapter").items()}
    if family == "mixtral":  # down_proj at rank 3 by the pattern, gate_up_proj nested inside it
        assert shapes[f"{PREFIX}.0.mlp.experts.lora_A.weight"] == (3 * 4, 32)
        assert shapes[f"{PREFIX}.0.mlp.experts.base_layer.lora_A.weight"] == (2 * 4, 64)
    else:  # gate_up_proj alone: no nesting
        assert shapes[f"{PREFIX}.0.mlp.experts.lora_A.weight"] == (2 * 4, 64)
        assert not any("base_layer" in k for k in shapes)
    ids = _ids()
    ref = torch_logits(pm, ids)
    model = load_peft_adapter(load_pretrained(path, scan_layers=scan), tmp_path / "adapter")
    assert set(model.lora_config.target_parameters) == set(PEFT_MADE[family]["target_parameters"])  # peft: a set
    assert np.abs(_logits(model, ids) - ref).max() <= ATOL


def test_sgd_steps_change_only_lora_leaves(hf_zoo):
    """The optimizer gets exactly the LoRA leaves, the expert ones included, and a few jitted SGD steps move every
    expert adapter leaf; the expert base weights sit in the frozen part."""
    from jaxtune.train.partition import split_trainable, trainable_filter
    from jaxtune.train.step import jit_train_step

    path, _ = hf_zoo("mixtral")
    graphdef, trainable, frozen = split_trainable(lora_model(path, True), trainable_filter("lora"))
    flat = nnx.to_flat_state(trainable)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in flat)
    experts = {p for p, _ in flat if "experts" in p}
    assert {p[-1] for p in experts} == {f"{t}_lora_{ab}" for t in ("gate_up_proj", "down_proj") for ab in "AB"}
    assert {p[-1] for p, _ in nnx.to_flat_state(frozen) if "experts" in p} == {"gate_up_proj", "down_proj"}
    before = {p: np.array(v[...]) for p, v in flat}
    ids = _ids((2, 9), seed=1)
    ones = np.ones((2, 8), np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": ones, "segment_ids": ones,
             "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1))}
    tx = optax.sgd(0.1)
    opt_state, step = tx.init(trainable), jit_train_step(tx)
    for i in range(3):
        trainable, opt_state, metrics = step(graphdef, trainable, frozen, opt_state, batch, jax.random.key(i))
    assert bool(metrics["finite"])
    after = dict(nnx.to_flat_state(trainable))
    assert all(np.abs(np.asarray(after[p][...]) - before[p]).max() > 0 for p in experts)


def test_targets_experts_only_as_peft_does(hf_zoo):
    """"all-linear" never reaches the experts (they are parameters, not linears); `target_modules: []` with
    target_parameters adapts the experts alone; layers_to_transform and exclude_modules leave them alone."""
    from jaxtune.structs import from_dict
    from jaxtune.train.partition import param_report

    path, _ = hf_zoo("qwen3_moe")
    base = load_pretrained(path)
    plain = apply_lora(nnx.clone(base), LoraConfig(dropout=0.0))
    assert not list(expert_lora_sites(plain)) and all(e.gate_up_proj_lora_A is None for e in _experts(plain))
    cfg = from_dict(LoraConfig, {"rank": 2, "dropout": 0, "target_modules": [], "target_parameters": EXPERTS,
                                 "layers_to_transform": [2], "exclude_modules": ["model.layers.0.mlp.experts"]},
                    "lora")
    only = apply_lora(nnx.clone(base), cfg)
    assert not list(lora_sites(only))
    assert [(n, p) for n, _, p, _ in expert_lora_sites(only)] == [
        (f"model.layers.{i}.mlp.experts.{p}", p) for i in (0, 2) for p in ("gate_up_proj", "down_proj")]
    report = param_report(base.config, cfg)
    assert report.lora_modules == 4
    assert report.lora_params == 2 * 2 * 4 * ((64 + 64) + (32 + 64))  # layers · r · E · (in + out), both tensors


def _experts(model):
    from jaxtune.model.moe import Experts

    return [node for _, node in nnx.iter_graph(model) if isinstance(node, Experts)]


@pytest.mark.parametrize("kw,match", [
    ({"target_parameters": ["mlp.experts.up_proj"]}, (r"entry 'mlp.experts.up_proj' matches no parameter: this "
                                                      r"mixtral model's expert tensors are mlp.experts.gate_up_proj")),
    ({"target_parameters": ["self_attn.q_proj.weight"]}, "is not an MoE expert tensor"),
    ({"target_modules": ["experts"]}, r"not a linear layer \(its tensors take lora.target_parameters"),
])
def test_bad_targets_are_refused_clearly(hf_zoo, kw, match):
    path, _ = hf_zoo("mixtral")
    with pytest.raises(LoraConfigError, match=match):
        resolve_targets(LoraConfig(dropout=0.0, **kw), load_pretrained(path))


RECIPE = BASE + """\
lora:
  target_modules: []
  target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
"""


def test_recipe_lora_section_and_refusals(tmp_path):
    from jaxtune.recipe import ConfigError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE + "  dropout: 0.0\n")
    lora = load_recipe(recipe).lora
    assert (lora.target_modules, lora.target_parameters) == ((), tuple(EXPERTS))
    recipe.write_text(RECIPE)
    with pytest.raises(ConfigError, match=r"r.yaml:11: lora.dropout=0.05 with lora.target_parameters.*set "
                                          r"lora.dropout: 0"):
        load_recipe(recipe)
    with pytest.raises(LoraConfigError, match="lora.target_modules is empty and lora.target_parameters is not set"):
        LoraConfig(target_modules=[], dropout=0.0)
    with pytest.raises(LoraConfigError, match="lora.target_parameters: expected a list"):
        LoraConfig(target_parameters="mlp.experts.down_proj", dropout=0.0)
    assert LoraConfig(target_parameters=[], dropout=0.05).target_parameters is None


def test_dense_model_refuses_target_parameters(hf_zoo):
    path, _ = hf_zoo("llama_gqa")
    with pytest.raises(LoraConfigError, match="this llama model has no MoE experts"):
        apply_lora(load_pretrained(path), LoraConfig(dropout=0.0, target_parameters=EXPERTS))


def test_stacked_experts_shapes(hf_zoo):
    path, _ = hf_zoo("mixtral")
    model = apply_lora(load_pretrained(path, scan_layers=True), LoraConfig(
        rank=2, dropout=0.0, target_modules=[], target_parameters=["model.layers.1.mlp.experts.down_proj"]))
    (experts,) = _experts(model)
    assert experts.gate_up_proj_lora_A is None
    a, b = experts.down_proj_lora_A, experts.down_proj_lora_B
    assert (a.shape, b.shape, a.dtype) == ((2, 8, 32), (2, 64, 8), jnp.float32)
    assert a.get_metadata()["axes"] == ("layers", "expert", "mlp") and float(jnp.abs(a[...][0]).max()) == 0
    bound = 1 / np.sqrt(32)
    assert 0.5 * bound < float(jnp.abs(a[...][1]).max()) <= bound and float(jnp.abs(b[...]).max()) == 0
    assert [(n, i) for n, _, _, i in expert_lora_sites(model)] == [("model.layers.1.mlp.experts.down_proj", 1)]
