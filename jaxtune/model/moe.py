"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE): a top-k router and grouped expert matmuls.

Parameters keep HF's in-memory names and layouts (`gate.weight` [E, H], `experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) so the HF mapping is a rename. The (token, slot) assignments are sorted by expert
and each expert's rows form one group of `jax.lax.ragged_dot_general`, so a kernel that honours the groups
(TPU, GPU) spends k/E of the dense all-experts FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.model.config import UnsupportedConfigError
from jaxtune.model.layers import _normal, merged_weight
from jaxtune.model.quant import param_value, recomputed

Array = jax.Array

ACTIVATIONS = {"silu": jax.nn.silu}

# `x[m, in]` against `w[E, out, in]` (HF's [out, in] per expert), rows of `x` grouped by expert.
_GROUPED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def peft_expert_factors(lora_a: Array, lora_b: Array, num_experts: int) -> tuple[Array, Array]:
    """PEFT `ParamWrapper` factors → per-expert `(A [E, r, in], B [E, out, r])`.

    PEFT stores one `lora_A` [r·E, in] whose rows are expert-major (row e·r + j) and one `lora_B` [out, r·E]
    whose columns are rank-major (column j·E + e); the two reshapes differ, so this is the one place that knows.
    Leading (layer) axes pass through."""
    a = lora_a.reshape(*lora_a.shape[:-2], num_experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(*lora_b.shape[:-1], -1, num_experts)
    return a, jnp.moveaxis(b, -1, -3)


def merged_expert_weight(weight: Array, lora_a: Array, lora_b: Array, scale: float, dtype=None) -> Array:
    """`W[e] + scale·B[e]·A[e]` for every expert from PEFT-layout factors, in fp32 with one cast (to `dtype`,
    default W's): the weight `peft` computes for a `target_parameters` adapter, for the forward and for export."""
    a, b = peft_expert_factors(lora_a, lora_b, weight.shape[-3])
    return merged_weight(weight, a, b, scale, dtype)


def route(logits: Array, top_k: int, norm_topk_prob: bool, fp32_weights: bool) -> tuple[Array, Array, Array]:
    """(fp32 probabilities [N, E], routing weights [N, k], expert ids [N, k]) as HF's routers compute them:
    softmax in fp32, top-k, optional renormalisation; the weights stay fp32 (Mixtral) or take the logits'
    dtype (Qwen3-MoE), which changes the bf16 rounding of each expert's scaled output."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights if fp32_weights else weights.astype(logits.dtype), experts


def routing_stats(probs: Array, experts: Array, token_mask: Array | None) -> dict[str, Array]:
    """Sums over this layer's unmasked tokens that the load-balancing loss needs. Sums, not means, so layers
    (and micro-batches) add up before one normalisation, as HF's loss normalises over all layers' tokens."""
    mask = jnp.ones(probs.shape[0], jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    picked = jnp.sum(jax.nn.one_hot(experts, probs.shape[-1], dtype=jnp.float32), axis=1)
    return {"expert_tokens": jnp.sum(picked * mask[:, None], axis=0),
            "expert_probs": jnp.sum(probs * mask[:, None], axis=0),
            "tokens": jnp.sum(mask)}


def load_balancing_loss(stats: dict[str, Array]) -> Array:
    """HF's `load_balancing_loss_func` from `routing_stats` summed over layers: E · Σₑ fₑ·Pₑ, with fₑ the share of
    top-k assignments and Pₑ the mean router probability of expert e over all layers' unmasked tokens. Zero when
    every token is masked (HF divides 0 by 0)."""
    tokens = jnp.maximum(stats["tokens"], 1.0)
    num_experts = stats["expert_probs"].shape[-1]
    return num_experts * jnp.sum((stats["expert_tokens"] / tokens) * (stats["expert_probs"] / tokens))


class Router(nnx.Module):
    """`logits = x Wᵀ` in the compute dtype (HF: `mlp.gate`)."""

    def __init__(self, hidden_size: int, num_experts: int, *, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.dtype = dtype
        self.weight = nnx.Param(_normal(rngs, (num_experts, hidden_size), std, param_dtype), axes=("expert", "embed"))

    def __call__(self, x: Array) -> Array:
        return jnp.einsum("nh,eh->ne", x.astype(self.dtype), self.weight[...].astype(self.dtype))


# The expert tensors, in the order transformers registers them (PEFT nests its wrappers in this order).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


class Experts(nnx.Module):
    """E gated-activation MLPs stored as 3-D tensors (HF: `mlp.experts`), evaluated only on routed rows.

    LoRA leaves (`<param>_lora_A` [r·E, in], `<param>_lora_B` [out, r·E], fp32, PEFT's `ParamWrapper` shapes;
    `<param>_lora_scale`) are absent until an adapter is attached; the forward then uses each expert's
    `W + scale·B·A`, as `peft` does (it has no dropout on these either)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, act, dtype, param_dtype,
                 rngs: nnx.Rngs, std: float = 0.02):
        e, h, i = num_experts, hidden_size, intermediate_size
        self.act, self.dtype = act, dtype
        self.gate_up_proj = nnx.Param(_normal(rngs, (e, 2 * i, h), std, param_dtype), axes=("expert", "mlp", "embed"))
        self.down_proj = nnx.Param(_normal(rngs, (e, h, i), std, param_dtype), axes=("expert", "embed", "mlp"))
        self.gate_up_proj_lora_A: nnx.LoRAParam | None = None
        self.gate_up_proj_lora_B: nnx.LoRAParam | None = None
        self.gate_up_proj_lora_scale = 0.0
        self.down_proj_lora_A: nnx.LoRAParam | None = None
        self.down_proj_lora_B: nnx.LoRAParam | None = None
        self.down_proj_lora_scale = 0.0
        self.gate_up_proj_quant = None
        self.down_proj_quant = None

    def weight(self, name: str) -> Array:
        """`gate_up_proj` or `down_proj` in the compute dtype (dequantized if quantized), with its adapter merged
        in when one is attached."""
        lora_a = getattr(self, f"{name}_lora_A")
        if lora_a is None:
            return param_value(self, name, self.dtype)
        return merged_expert_weight(param_value(self, name, jnp.float32), lora_a[...],
                                    getattr(self, f"{name}_lora_B")[...], getattr(self, f"{name}_lora_scale"),
                                    self.dtype)

    def _grouped(self, name: str, rows: Array, sizes: Array) -> Array:
        """`rows` (grouped by expert) times their expert's `name` weight; a quantized weight (or one merged
        from a quantized base) is rebuilt in the backward pass, not kept."""
        matmul = lambda r: jax.lax.ragged_dot_general(r, self.weight(name), sizes, _GROUPED)  # noqa: E731
        return matmul(rows) if getattr(self, f"{name}_quant") is None else recomputed(matmul)(rows)

    def __call__(self, x: Array, experts: Array, weights: Array) -> Array:
        """`x[N, H]`, `experts[N, k]` ids, `weights[N, k]` → `Σ_slots weight · expert(x)` [N, H]."""
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=self.gate_up_proj.shape[0]).astype(jnp.int32)
        rows = x.astype(self.dtype)[order // k]
        gate, up = jnp.split(self._grouped("gate_up_proj", rows, sizes), 2, -1)
        out = self._grouped("down_proj", self.act(gate) * up, sizes)
        out = out[jnp.argsort(order)].reshape(n, k, -1)
        scaled = (out.astype(jnp.float32) * weights.astype(jnp.float32)[..., None]).astype(self.dtype)
        return jnp.sum(scaled.astype(jnp.float32), axis=1).astype(self.dtype)


class MoE(nnx.Module):
    """Sparse MoE feed-forward (HF: `MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` at `layers.{i}.mlp`).

    Returns the output and `routing_stats` for the load-balancing loss; `token_mask` (True on real tokens)
    only keeps padding out of those stats, every token is still routed."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        if cfg.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(f"hidden_act={cfg.hidden_act!r} for the MoE experts: expected one of "
                                         f"{', '.join(ACTIVATIONS)}")
        if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
            raise UnsupportedConfigError(f"num_experts_per_tok={cfg.num_experts_per_tok} must be in 1.."
                                         f"num_experts={cfg.num_experts}")
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router_fp32_weights = cfg.router_fp32_weights
        self.gate = Router(cfg.hidden_size, cfg.num_experts, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                               act=ACTIVATIONS[cfg.hidden_act], dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, token_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, experts = route(self.gate(flat), self.top_k, self.norm_topk_prob, self.router_fp32_weights)
        return self.experts(flat, experts, weights).reshape(x.shape), routing_stats(probs, experts, token_mask)
