"""MoE block: HF parity (Mixtral, Qwen3-MoE), PEFT `target_parameters` adapters, HF's load-balancing loss,
expert sharding, and (with libtpu) FLOPs that scale with k/E."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.model.moe import MoE, load_balancing_loss, merged_expert_weight, route, routing_stats
from jaxtune.model.sharding import DEFAULT_RULES, tree_shardings

E, K, H, I = 4, 2, 16, 24


@dataclasses.dataclass(frozen=True)
class MoECfg:
    """The ModelConfig fields MoE reads (a stand-in until ModelConfig has them)."""
    hidden_size: int = H
    moe_intermediate_size: int = I
    num_experts: int = E
    num_experts_per_tok: int = K
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    router_fp32_weights: bool = True


def _hf_block(family: str, norm_topk_prob: bool = True):
    """(HF sparse MoE block, fp32, weights ~N(0, 0.1); the matching config for ours)."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    if family == "mixtral":
        block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                    num_experts_per_tok=K))
        cfg = MoECfg()
    else:
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                                      num_experts_per_tok=K, norm_topk_prob=norm_topk_prob))
        cfg = MoECfg(norm_topk_prob=norm_topk_prob, router_fp32_weights=False)
    block.experts.config._experts_implementation = "eager"
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block.eval(), cfg


def _t2j(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().float().numpy())


def _ours(block, cfg) -> MoE:
    moe = MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    experts = getattr(block.experts, "get_base_layer", lambda: block.experts)()
    moe.gate.weight[...] = _t2j(block.gate.weight)
    moe.experts.gate_up_proj[...] = _t2j(experts.gate_up_proj)
    moe.experts.down_proj[...] = _t2j(experts.down_proj)
    return moe


def _x(shape=(2, 7, H), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_forward_matches_hf_block(family, norm):
    block, cfg = _hf_block(family, norm)
    x = _x()
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    got, _ = _ours(block, cfg)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routing_weights_take_hf_dtype(family):
    """Mixtral keeps the top-k weights in fp32, Qwen3-MoE casts them to the logits' dtype: with bf16 logits the
    two round each expert's scaled output differently. An identity router makes HF's logits our input."""
    block, cfg = _hf_block(family)
    gate = block.gate.to(torch.bfloat16)
    gate.hidden_dim = E
    gate.weight = torch.nn.Parameter(torch.eye(E, dtype=torch.bfloat16))
    logits = torch.from_numpy(_x((64, E))).to(torch.bfloat16)
    with torch.no_grad():
        _, want, want_idx = gate(logits)
    _, got, got_idx = route(_t2j(logits).astype(jnp.bfloat16), K, cfg.norm_topk_prob, cfg.router_fp32_weights)
    assert got.dtype == {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[want.dtype]
    np.testing.assert_array_equal(np.asarray(got_idx), want_idx.numpy())
    np.testing.assert_allclose(np.asarray(got, np.float32), want.float().numpy(), rtol=1e-6, atol=1e-7)


# PEFT `target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` state-dict keys → our leaves. PEFT
# wraps the parameters in the module's registration order (gate_up_proj, then down_proj around it), so the
# inner one's keys carry `base_layer.`.
PEFT_KEYS = {
    "mlp.experts.base_layer.lora_A.weight": ("gate_up_proj_lora_A", (2 * E, H)),
    "mlp.experts.base_layer.lora_B.weight": ("gate_up_proj_lora_B", (2 * I, 2 * E)),
    "mlp.experts.lora_A.weight": ("down_proj_lora_A", (2 * E, I)),
    "mlp.experts.lora_B.weight": ("down_proj_lora_B", (H, 2 * E)),
}


def _peft_block(family: str):
    """HF block inside a `.mlp` parent, both expert tensors adapted (r=2, alpha=3), lora_B non-zero."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    block, cfg = _hf_block(family)
    parent = torch.nn.Module()
    parent.mlp = block
    lora = LoraConfig(r=2, lora_alpha=3, target_modules=[],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    parent = inject_adapter_in_model(lora, parent)
    torch.manual_seed(1)
    for name, p in parent.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    return parent, cfg, get_peft_model_state_dict(parent)


def _attach(moe: MoE, peft_sd: dict, scale: float) -> None:
    for key, (leaf, _) in PEFT_KEYS.items():
        setattr(moe.experts, leaf, nnx.data(nnx.LoRAParam(_t2j(peft_sd[key]))))
    moe.experts.gate_up_proj_lora_scale = moe.experts.down_proj_lora_scale = scale


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_matches_peft_target_parameters(family):
    parent, cfg, peft_sd = _peft_block(family)
    assert {k: tuple(v.shape) for k, v in peft_sd.items()} == {k: s for k, (_, s) in PEFT_KEYS.items()}
    moe = _ours(parent.mlp, cfg)
    x = _x()
    without, _ = moe(jnp.asarray(x))
    _attach(moe, peft_sd, scale=3 / 2)
    with torch.no_grad():
        want = parent.mlp(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(without) - want).max() > 1e-2
    got, _ = moe(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_merged_expert_weight_is_peft_merge():
    """The export weight equals PEFT's own `W + delta` per adapted parameter, also with a leading layer axis."""
    parent, _, peft_sd = _peft_block("mixtral")
    outer = parent.mlp.experts
    inner = outer.base_layer
    for wrapper, name in ((inner, "gate_up_proj"), (outer, "down_proj")):
        w = getattr(wrapper.get_base_layer(), name)
        want = (w + wrapper.get_delta_weight("default")).detach().numpy()
        a_key, b_key = [k for k, (leaf, _) in PEFT_KEYS.items() if leaf.startswith(name)]
        a, b = _t2j(peft_sd[a_key]), _t2j(peft_sd[b_key])
        np.testing.assert_allclose(np.asarray(merged_expert_weight(_t2j(w), a, b, 1.5)), want, atol=1e-6)
        stacked = merged_expert_weight(jnp.stack([_t2j(w), 0 * _t2j(w)]), jnp.stack([a, a]), jnp.stack([b, -b]), 1.5)
        np.testing.assert_allclose(np.asarray(stacked[0]), want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(stacked[1]), -(want - w.detach().numpy()), atol=1e-6)


def _dense_reference(moe: MoE, x: jax.Array) -> jax.Array:
    """Every expert on every token, combined by the routing weights: the computation ragged_dot replaces."""
    flat = x.reshape(-1, H)
    _, w, idx = route(moe.gate(flat), K, True, True)
    combine = jnp.sum(jax.nn.one_hot(idx, E) * w[..., None], axis=1)
    gate, up = jnp.split(jnp.einsum("nh,eoh->neo", flat, moe.experts.weight("gate_up_proj")), 2, -1)
    out = jnp.einsum("nei,ehi->neh", jax.nn.silu(gate) * up, moe.experts.weight("down_proj"))
    return jnp.einsum("ne,neh->nh", combine, out).reshape(x.shape)


def test_gradients_match_dense_reference():
    """Training goes through the sort, ragged_dot and unsort: gradients for LoRA leaves, router and input match
    the dense formulation."""
    parent, cfg, peft_sd = _peft_block("mixtral")
    moe = _ours(parent.mlp, cfg)
    _attach(moe, peft_sd, scale=1.5)
    graphdef, lora, rest = nnx.split(moe, nnx.LoRAParam, ...)
    x = jnp.asarray(_x())
    probe = jnp.asarray(_x((2, 7, H), seed=1))

    def grads(forward):
        def loss(lora, rest, x):
            return jnp.sum(forward(nnx.merge(graphdef, lora, rest), x) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(lora, rest, x)

    got = grads(lambda m, x: m(x)[0])
    want = grads(_dense_reference)
    assert float(jnp.abs(jax.tree.leaves(got[0])[0]).max()) > 0
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5), got, want)


def _hf_loss(layer_logits, mask):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return float(load_balancing_loss_func(tuple(torch.from_numpy(np.array(lg)) for lg in layer_logits), E, K,
                                          None if mask is None else torch.from_numpy(mask)))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_hf(masked):
    """Three layers' logits with different spreads: HF normalises over all layers' tokens at once, which a mean
    of per-layer losses does not reproduce."""
    rng = np.random.default_rng(0)
    b, t = 3, 5
    layer_logits = [jnp.asarray(rng.normal(size=(b * t, E)).astype(np.float32) * s + bias)
                    for s, bias in ((0.5, 0.0), (2.0, np.array([1.5, 0, 0, -1])), (4.0, np.array([0, 0, 2, 0])))]
    mask = (np.arange(t)[None] < np.array([5, 2, 4])[:, None]).astype(np.int64) if masked else None
    per_layer = []
    for lg in layer_logits:
        probs, _, idx = route(lg, K, True, True)
        per_layer.append(routing_stats(probs, idx, None if mask is None else jnp.asarray(mask, bool)))
    total = jax.tree.map(lambda *s: sum(s), *per_layer)
    want = _hf_loss(layer_logits, mask)
    np.testing.assert_allclose(float(load_balancing_loss(total)), want, rtol=1e-6)
    mean_of_layers = np.mean([float(load_balancing_loss(s)) for s in per_layer])
    assert abs(mean_of_layers - want) > 1e-3
    if masked:
        assert abs(_hf_loss(layer_logits, None) - want) > 1e-3


def test_moe_returns_masked_routing_stats():
    block, cfg = _hf_block("mixtral")
    moe = _ours(block, cfg)
    mask = np.ones((2, 7), bool)
    mask[1, 3:] = False
    _, stats = moe(jnp.asarray(_x()), jnp.asarray(mask))
    assert float(stats["tokens"]) == mask.sum()
    assert float(stats["expert_tokens"].sum()) == K * mask.sum()
    np.testing.assert_allclose(float(stats["expert_probs"].sum()), mask.sum(), rtol=1e-6)


def test_experts_sharded_over_expert_axis_match_unsharded():
    block, cfg = _hf_block("qwen3_moe")
    moe = _ours(block, cfg)
    x = jnp.asarray(_x((4, 6, H)))
    want, want_stats = moe(x)

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
    rules = {**DEFAULT_RULES, "expert": "expert"}
    graphdef, state = nnx.split(moe)
    shardings = tree_shardings(state, mesh, rules)
    assert shardings["experts"]["gate_up_proj"].spec == P("expert", None, None)
    assert shardings["experts"]["down_proj"].spec == P("expert", None, None)
    state = jax.device_put(state, shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    got, got_stats = forward(state, xs)
    assert state["experts"]["down_proj"][...].sharding.spec == P("expert", None, None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6), got_stats,
                 want_stats)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e '.[tpu-compile]') for a compile-only TPU client")
def test_tpu_compiled_flops_scale_with_k_over_e():
    """On CPU ragged_dot runs as a dense dot over all groups; TPU's compiler keeps the groups, so the compiled
    forward costs about k/E of the dense all-experts forward."""
    from jaxtune.train.plan import topology_devices

    e, k, h, i, n = 8, 2, 128, 256, 512
    cfg = MoECfg(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                           rngs=nnx.Rngs(0))))
    devices = topology_devices("v5e:2x2")
    replicated = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), P())
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    x = jax.ShapeDtypeStruct((4, n // 4, h), jnp.bfloat16, sharding=replicated)

    def flops(forward):
        return jax.jit(lambda s, x: forward(nnx.merge(graphdef, s), x)).lower(state, x).compile().cost_analysis()[
            "flops"]

    def dense(moe, x):
        flat = x.reshape(-1, h)
        _, w, idx = route(moe.gate(flat), k, True, True)
        combine = jnp.sum(jax.nn.one_hot(idx, e, dtype=x.dtype) * w[..., None].astype(x.dtype), axis=1)
        gate, up = jnp.split(jnp.einsum("nh,eoh->neo", flat, moe.experts.gate_up_proj[...]), 2, -1)
        out = jnp.einsum("nei,ehi->neh", jax.nn.silu(gate) * up, moe.experts.down_proj[...])
        return jnp.einsum("ne,neh->nh", combine, out)

    sparse_flops, dense_flops = flops(lambda m, x: m(x)[0]), flops(dense)
    expert_flops = 2 * n * k * 3 * h * i
    assert expert_flops <= sparse_flops <= 1.05 * expert_flops
    assert sparse_flops / dense_flops == pytest.approx(k / e, rel=0.05)
