"""ModelConfig: the few numbers and math flags that tell the supported families apart.

Built from an HF config by `jaxtune.hf.families` (the only place that knows HF config fields); this module
knows only what the model computes, and refuses combinations it cannot compute.
"""

from __future__ import annotations

import dataclasses

# RoPE frequency schedules `model/layers.rope_inv_freq` implements.
ROPE_TYPES = ("default", "llama3", "linear", "longrope")
# MLP gate activations: SwiGLU's silu, GeGLU's tanh-approximated gelu (Gemma), exact gelu.
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
# How RMSNorm applies its weight: `llama` casts the normalised input back to its dtype, then scales; `fp32`
# scales in fp32, then casts (OLMo 2); `gemma` scales by (1 + w) in fp32, then casts.
NORM_STYLES = ("llama", "fp32", "gemma")
# Where a decoder layer's norms sit: `pre` on each sub-layer's input (Llama), `sandwich` on its input and
# output (Gemma 2/3), `post` on its output only (OLMo 2).
NORM_LAYOUTS = ("pre", "sandwich", "post")
# q/k RMSNorm: none, over each head (Qwen3, Gemma 3) or over the whole projection (OLMo 2).
QK_NORMS = ("none", "head", "projection")
# The attention backends (`auto` picks one per platform in `model/attention`).
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cpu_flash", "cudnn", "splash")
# The one dtype-name table: recipe, CLI and config.json names, with the short spellings users type.
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
REMAT_POLICIES = ("none", "full", "dots")


def parse_dtype(name, what: str = "dtype"):
    """A dtype name from `DTYPES` (or a dtype) → the jnp dtype; a bad name is a ValueError naming `what`."""
    import jax.numpy as jnp

    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r}: expected one of {', '.join(DTYPES)}")
    return jnp.dtype(DTYPES[name])


def dtype_name(dtype) -> str:
    """The canonical name (`bfloat16`, not `bf16`) of a dtype or a `DTYPES` name."""
    return DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else parse_dtype(dtype).name


class UnsupportedConfigError(ValueError):
    """An HF config field whose value jaxtune cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # the HF model_type, which names the family entry (weights' names, config translation)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"
    hidden_act: str = "silu"
    norm_style: str = "llama"
    norm_layout: str = "pre"
    # Scores are `q·k × attention_scale` (None: 1/√head_dim), soft-capped as `c·tanh(s/c)` when set.
    attention_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    # RoPE base of the sliding layers when it differs from the global layers' (Gemma 3's local base).
    sliding_rope_theta: float | None = None
    partial_rotary_factor: float = 1.0
    # longrope: per-frequency divisors below and above `rope_original_max_position`, and the cos/sin factor.
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0
    # Phi-3 keeps q/k/v and gate/up as one matmul each (`qkv_proj`, `gate_up_proj`).
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Mixture of experts: `moe_layers[i]` is True where layer i's MLP is a routed set of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # Mixtral keeps the routing weights in fp32; Qwen3-MoE casts them to the activations' dtype.
    router_fp32_weights: bool = True
    moe_layers: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.0
    sliding_window: int | None = None
    # One entry per layer: True where the sliding window applies (HF `layer_types == "sliding_attention"`).
    sliding_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # More stop ids from the checkpoint's generation_config.json (Gemma's `<end_of_turn>`); not in config.json.
    generation_eos_token_id: tuple[int, ...] = ()
    # Runtime options (not from HF): how to run, not what the weights mean.
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.attention_impl == "cudnn" and self.attn_softcap is not None:
            raise ValueError(f"attention_impl='cudnn' cannot soft-cap attention logits, which this model does "
                             f"(attn_softcap={self.attn_softcap}); use 'auto', 'xla' or 'blockwise'")
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(f"rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}")
        for name, value, allowed in (("hidden_act", self.hidden_act, ACTIVATIONS),
                                     ("norm_style", self.norm_style, NORM_STYLES),
                                     ("norm_layout", self.norm_layout, NORM_LAYOUTS),
                                     ("qk_norm", self.qk_norm, QK_NORMS)):
            if value not in allowed:
                raise UnsupportedConfigError(f"{name}={value!r}: expected one of {allowed}")
        if self.rope_type == "longrope" and len(self.rope_short_factor) != len(self.rope_long_factor):
            raise UnsupportedConfigError("longrope short_factor and long_factor differ in length")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise UnsupportedConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives rotary dim "
                                         f"{self.rotary_dim} of head_dim {self.head_dim}")
        if self.rope_type == "longrope" and len(self.rope_short_factor) != self.rotary_dim // 2:
            raise UnsupportedConfigError(f"longrope factors have {len(self.rope_short_factor)} entries, the rotary "
                                         f"dimension {self.rotary_dim} needs {self.rotary_dim // 2}")
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_hidden_layers)
        if len(self.moe_layers) != self.num_hidden_layers:
            raise UnsupportedConfigError(f"{len(self.moe_layers)} MoE layer flags for {self.num_hidden_layers} layers")
        if any(self.moe_layers) and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedConfigError(f"num_experts_per_tok={self.num_experts_per_tok} with "
                                         f"num_experts={self.num_experts}")
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (self.sliding_window is not None,) * self.num_hidden_layers)
        if len(self.sliding_layers) != self.num_hidden_layers:
            raise UnsupportedConfigError(
                f"layer_types has {len(self.sliding_layers)} entries for {self.num_hidden_layers} layers"
            )
        if any(self.sliding_layers) and self.sliding_window is None:
            raise UnsupportedConfigError("layer_types marks sliding_attention layers but sliding_window is null")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def layer_stacks(self) -> dict[str, tuple[int, ...]]:
        """Under `scan_layers`, each stacked-layer attribute and the layers it holds, in order: every layer in
        `layers`, or with dense and MoE layers mixed (a stack shares one structure) the MoE layers in `layers`
        and the dense ones in `dense_layers`. Empty without scan."""
        if not self.scan_layers:
            return {}
        if len(set(self.moe_layers)) == 1:
            return {"layers": tuple(range(self.num_hidden_layers))}
        return {"layers": tuple(i for i, m in enumerate(self.moe_layers) if m),
                "dense_layers": tuple(i for i, m in enumerate(self.moe_layers) if not m)}

    def stack_slot(self, layer: int) -> tuple[str, int]:
        """(stacked attribute, index in it) of a layer under `scan_layers`."""
        return next((name, layers.index(layer)) for name, layers in self.layer_stacks.items() if layer in layers)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_layers[layer] else None

    def num_params(self) -> int:
        """Analytic parameter count (matches the HF checkpoint, tied head counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        attn += {"none": 0, "head": 2 * hd, "projection": q + kv}[self.qk_norm]
        dense = 3 * d * f + (2 * f + d) * self.mlp_bias
        moe = self.num_experts * (d + 3 * d * self.moe_intermediate_size)
        norms = d * {"pre": 2, "sandwich": 4, "post": 2}[self.norm_layout]
        layers = sum(attn + norms + (moe if m else dense) for m in self.moe_layers)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + layers + d + head
