"""ModelConfig: the few numbers that tell Llama, Mistral, Qwen2, Qwen3 and SmolLM apart.

Built from a `transformers` config object (never raw JSON: class defaults differ per family and v5 moved
`rope_theta` into `rope_parameters`). Fields we cannot honour fail loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
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
    model_type: str
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


def _get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default)


def _rope(hf: Any) -> dict:
    """Merge v5 `rope_parameters` and v4 `rope_theta`/`rope_scaling` into one dict."""
    params = dict(_get(hf, "rope_parameters") or {})
    scaling = _get(hf, "rope_scaling")
    if scaling and scaling is not params:
        params.update(scaling)
    if "rope_theta" not in params and _get(hf, "rope_theta") is not None:
        params["rope_theta"] = _get(hf, "rope_theta")
    params.setdefault("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def from_hf_config(hf: Any, **runtime: Any) -> ModelConfig:
    """Translate a `transformers.PretrainedConfig` into a ModelConfig, refusing what we can't match."""
    mt = _get(hf, "model_type")
    if mt not in SUPPORTED_FAMILIES:
        raise UnsupportedConfigError(
            f"model_type={mt!r} is not supported; jaxtune supports {', '.join(SUPPORTED_FAMILIES)} "
            "(SmolLM/SmolLM2 are model_type 'llama')"
        )
    act = _get(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    if (_get(hf, "pretraining_tp", 1) or 1) != 1:
        raise UnsupportedConfigError("pretraining_tp != 1 is not supported")

    rope = _rope(hf)
    rtype = rope["rope_type"]
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope_scaling/rope_parameters rope_type={rtype!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("rope partial_rotary_factor != 1 is not supported")

    heads = _get(hf, "num_attention_heads")
    kv_heads = _get(hf, "num_key_value_heads") or heads
    hidden = _get(hf, "hidden_size")
    head_dim = _get(hf, "head_dim") or hidden // heads

    attention_bias = bool(_get(hf, "attention_bias", False))
    qkv_bias = o_bias = mlp_bias = False
    if mt == "llama":
        qkv_bias = o_bias = attention_bias
        mlp_bias = bool(_get(hf, "mlp_bias", False))
    elif mt == "mistral":
        if attention_bias:
            raise UnsupportedConfigError("attention_bias=True: Mistral has no attention bias")
    elif mt == "qwen2":
        qkv_bias = True
    elif mt == "qwen3":
        qkv_bias = o_bias = attention_bias

    window = _get(hf, "sliding_window")
    layers = _get(hf, "num_hidden_layers")
    layer_types = _get(hf, "layer_types")
    if mt == "mistral":
        sliding = (window is not None,) * layers
    elif mt in ("qwen2", "qwen3"):
        if layer_types is None:
            use = bool(_get(hf, "use_sliding_window", False)) and window is not None
            mwl = _get(hf, "max_window_layers", layers)
            layer_types = ["sliding_attention" if use and i >= mwl else "full_attention" for i in range(layers)]
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UnsupportedConfigError(f"layer_types contains unsupported {sorted(unknown)}")
        sliding = tuple(t == "sliding_attention" for t in layer_types)
        if not any(sliding):
            window = None
    else:
        if window is not None:
            raise UnsupportedConfigError(f"sliding_window={window}: the llama family has no sliding window")
        sliding = (False,) * layers

    eos = _get(hf, "eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    return ModelConfig(
        model_type=mt,
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]),
        rope_type=rtype,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=_get(hf, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=mt == "qwen3",
        sliding_window=window,
        sliding_layers=sliding,
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=eos,
        pad_token_id=_get(hf, "pad_token_id"),
        **runtime,
    )
