"""Building blocks with HF parameter names and layouts: Linear (with optional LoRA), Embed, RMSNorm, RoPE, MLP.

Weights keep HF's `[out, in]` layout so HF↔NNX mapping is a rename, and every parameter declares its
logical axes once (`axes=` metadata) for `model/sharding.py` to map onto a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.model.config import ModelConfig
from jaxtune.model.quant import param_parts, param_value, recomputed

Array = jax.Array


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    """Drawn directly in the parameter dtype: an fp32 draw then a cast would double peak init memory."""
    return std * jax.random.normal(rngs.params(), shape, dtype)


def merged_weight(weight: Array, lora_a: Array, lora_b: Array, scale: float, dtype=None) -> Array:
    """`W + scale·B·A`, delta and sum in fp32 and one cast at the end (to `dtype`, default W's dtype): a bf16
    delta or a bf16 add is where merged models drift from adapter-on-base. Leading (layer) axes broadcast."""
    delta = jnp.einsum("...or,...ri->...oi", lora_b.astype(jnp.float32), lora_a.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (weight.astype(jnp.float32) + scale * delta).astype(dtype or weight.dtype)


class Linear(nnx.Module):
    """`y = x Wᵀ (+ b) + scale · dropout(x) Aᵀ Bᵀ`; LoRA leaves (PEFT layout) are absent until `lora.apply_lora`.

    `lora_merged_forward` (static, set by whoever attaches the adapter) computes `x (W + scale·B·A)ᵀ` instead
    when no dropout applies: the same function, one full-width matmul instead of two rank-r ones. A quantized
    W (`weight_quant`, see model/quant.py) is dequantized right before its matmul; int8 codes go into the
    matmul as they are, their per-channel scale applied to its output."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, axes: tuple[str, str],
                 dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), std, param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[0],)) if bias else None
        self.lora_A: nnx.LoRAParam | None = None
        self.lora_B: nnx.LoRAParam | None = None
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.lora_merged_forward = False
        self.weight_quant = None

    def __call__(self, x: Array, dropout_rng: Array | None = None) -> Array:
        x = x.astype(self.dtype)
        if self.lora_dropout <= 0.0:
            dropout_rng = None
        merged = self.lora_A is not None and self.lora_merged_forward and dropout_rng is None
        base = self._merged if merged else self._base
        y = base(x) if self.weight_quant is None else recomputed(base)(x)
        if self.lora_A is not None and not merged:
            y = y + self._lora(x, dropout_rng)
        return y

    def _merged(self, x: Array) -> Array:
        return self._dense(x, merged_weight(param_value(self, "weight", jnp.float32), self.lora_A[...],
                                            self.lora_B[...], self.lora_scale, self.dtype))

    def _base(self, x: Array) -> Array:
        if self.weight_quant is None or self.weight_quant.kind != "int8":
            return self._dense(x, param_value(self, "weight", self.dtype))
        parts = param_parts(self, "weight")
        return self._dense(x, parts["weight"].astype(self.dtype), parts["scale"].astype(self.dtype))

    def _dense(self, x: Array, w: Array, out_scale: Array | None = None) -> Array:
        y = jnp.einsum("...i,oi->...o", x, w)
        y = y if out_scale is None else y * out_scale
        return y + self.bias[...].astype(self.dtype) if self.bias is not None else y

    def _lora(self, x: Array, dropout_rng: Array | None) -> Array:
        if dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        h = jnp.einsum("...i,ri->...r", x, self.lora_A[...].astype(self.dtype))
        h = jnp.einsum("...r,or->...o", h, self.lora_B[...].astype(self.dtype))
        return (h * self.lora_scale).astype(self.dtype)


class Embed(nnx.Module):
    """The token table; a quantized one (`weight_quant`) is dequantized whole where it is read, which costs one
    table's worth of temporaries per step for what it saves in resident memory."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.dtype = dtype
        self.weight = nnx.Param(_normal(rngs, (vocab, dim), std, param_dtype), axes=("vocab", "embed"))
        self.weight_quant = None

    def __call__(self, ids: Array) -> Array:
        if self.weight_quant is None:
            return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)
        return jnp.take(param_value(self, "weight", self.dtype), ids, axis=0)

    def attend(self, x: Array) -> Array:
        """Tied output head: logits against the embedding table."""
        logits = lambda h: jnp.einsum("...d,vd->...v", h, param_value(self, "weight", self.dtype))  # noqa: E731
        return logits(x) if self.weight_quant is None else recomputed(logits)(x)


class RMSNorm(nnx.Module):
    """HF semantics per `style` (see `config.NORM_STYLES`): normalise in fp32; `llama` casts back to the input
    dtype, then scales; `fp32` scales in fp32, then casts; `gemma` scales by (1 + w) in fp32, then casts."""

    def __init__(self, dim: int, eps: float, *, param_dtype, axes=("embed",), style: str = "llama"):
        self.eps, self.style = eps, style
        init = jnp.zeros if style == "gemma" else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype), axes=axes)

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.style == "llama":
            return w.astype(x.dtype) * xf.astype(x.dtype)
        w = w.astype(jnp.float32)
        return (xf * (1.0 + w if self.style == "gemma" else w)).astype(x.dtype)


ACT = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
       "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None, factors=None, scaled: bool = True) -> Array:
    """Inverse frequencies over the rotary dims for base `theta` (default the config's), with the config's
    `linear` or `llama3` scaling unless `scaled` is off, or divided by longrope `factors`; computed exactly as
    transformers does (fp32)."""
    dim = cfg.rotary_dim
    theta = cfg.rope_theta if theta is None else theta
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    if factors is not None:
        return 1.0 / (jnp.asarray(factors, jnp.float32) * theta ** exponent)
    inv = 1.0 / (theta ** exponent)
    if not scaled:
        return inv
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position
        lo, hi, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_frequencies(cfg: ModelConfig, positions: Array, sliding: Array | bool) -> Array:
    """The inverse frequencies one attention call uses. Sliding layers may have their own base (Gemma 3), and
    longrope picks its long factors for the whole call once `max(positions) + 1` passes the original context,
    as transformers does per forward (during decoding too)."""
    if cfg.rope_type == "longrope":
        long = jnp.max(positions) + 1 > cfg.rope_original_max_position
        inv = jnp.where(long, rope_inv_freq(cfg, factors=cfg.rope_long_factor),
                        rope_inv_freq(cfg, factors=cfg.rope_short_factor))
    else:
        inv = rope_inv_freq(cfg)
    if cfg.sliding_rope_theta is None or (isinstance(sliding, bool) and not sliding):
        return inv
    return jnp.where(sliding, rope_inv_freq(cfg, cfg.sliding_rope_theta, scaled=False), inv)


def apply_rope(x: Array, positions: Array, inv_freq: Array, scale: float = 1.0) -> Array:
    """rotate_half RoPE (HF layout) on the first `2·len(inv_freq)` dims of `x[B, T, H, D]` at integer
    `positions[B, T]`, cos/sin times `scale` (longrope's attention factor); the other dims pass through."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = scale * jnp.cos(emb)[:, :, None, :], scale * jnp.sin(emb)[:, :, None, :]
    rot, rest = x[..., :emb.shape[-1]], x[..., emb.shape[-1]:]
    half = rot.shape[-1] // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


class MLP(nnx.Module):
    """`down(act(gate(x)) · up(x))`; Phi-3 computes gate and up as one `gate_up_proj` (gate first)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_act, self.fused = cfg.hidden_act, cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = Linear(d, 2 * f, bias=b, axes=("mlp", "embed"), **kw)
        else:
            self.gate_proj = Linear(d, f, bias=b, axes=("mlp", "embed"), **kw)
            self.up_proj = Linear(d, f, bias=b, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(f, d, bias=b, axes=("embed", "mlp"), **kw)

    def __call__(self, x: Array, rngs: tuple | None = None) -> Array:
        r = rngs or (None,) * 3
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x, r[0]), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, r[0]), self.up_proj(x, r[1])
        return self.down_proj(ACT[self.hidden_act](gate) * up, r[2])
