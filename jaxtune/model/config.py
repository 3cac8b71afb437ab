"""ModelConfig: the few numbers and math flags that tell the supported families apart.

Built from an HF config by `jaxtune.hf.families` (the only place that knows HF config fields); this module
knows only what the model computes, and refuses combinations it cannot compute.
"""

from __future__ import annotations

import dataclasses

# RoPE frequency schedules `model/layers.rope_inv_freq` implements.
ROPE_TYPES = ("default", "llama3", "linear")
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
    qk_norm: bool = False
    sliding_window: int | None = None
    # One entry per layer: True where the sliding window applies (HF `layer_types == "sliding_attention"`).
    sliding_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
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
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(f"rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}")
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

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_layers[layer] else None

    def num_params(self) -> int:
        """Analytic parameter count (matches the HF checkpoint, tied head counted once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head
