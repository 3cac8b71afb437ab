"""The supported families, one `Family` entry per HF model_type (SmolLM and SmolLM2 are `llama`).

An entry holds everything that is specific to a family: its config translation (shared Llama-style parts
from `hf/config.py` plus its own), its tensor table (`hf/tensors.py`: names, prefixes, transforms) and the
linear modules LoRA targets. Adding a family means adding an entry here and, where its math differs, a flag
on ModelConfig. NNX paths are the HF names minus the prefix, so the Flax tree reads like the checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxtune.hf.config import LLAMA_CORE, Part, fixed, get, layer_types, read_parts, write_parts
from jaxtune.hf.tensors import Table, renames, rule
from jaxtune.model.config import ModelConfig, UnsupportedConfigError

# Linear modules of one decoder layer, as PEFT names them; "all-linear" means these (never lm_head).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the `architectures` entry an exported config.json names
    config: tuple[Part, ...]  # HF config ↔ ModelConfig, both directions
    tensors: Table
    linear_names: tuple[str, ...] = LINEAR_NAMES
    # Checkpoint tensors that carry no learned weights (buffers some exporters write).
    ignored: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)

    def from_hf(self, hf: Any) -> dict:
        """ModelConfig fields from a `transformers` config, refusing what this family cannot reproduce."""
        return read_parts(self.config, hf)

    def to_hf(self, cfg: ModelConfig) -> dict:
        """`transformers` config kwargs that `from_hf` reads back to `cfg`'s fields."""
        return write_parts(self.config, cfg)

    def ignores(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored)


# ---------------------------------------------------------------------------------------- config parts


def _attention_bias(hf: Any) -> dict:
    on = bool(get(hf, "attention_bias", False))
    return dict(qkv_bias=on, o_bias=on)


# `attention_bias` puts a bias on q, k, v and o alike.
ATTENTION_BIAS = Part(_attention_bias, lambda cfg: {"attention_bias": cfg.qkv_bias})
MLP_BIAS = Part(lambda hf: {"mlp_bias": bool(get(hf, "mlp_bias", False))}, lambda cfg: {"mlp_bias": cfg.mlp_bias})


def _refuse_attention_bias(hf: Any) -> dict:
    if get(hf, "attention_bias", False):
        raise UnsupportedConfigError("attention_bias=True: Mistral has no attention bias")
    return {}


def _refuse_window(hf: Any) -> dict:
    window = get(hf, "sliding_window")
    if window is not None:
        raise UnsupportedConfigError(f"sliding_window={window}: the llama family has no sliding window")
    return {}


NO_WINDOW = Part(_refuse_window)
# One window on every layer (or none).
UNIFORM_WINDOW = Part(lambda hf: {"sliding_window": get(hf, "sliding_window")},
                      lambda cfg: {"sliding_window": cfg.sliding_window})


def _read_layer_windows(hf: Any) -> dict:
    window, layers = get(hf, "sliding_window"), get(hf, "num_hidden_layers")
    types = layer_types(hf)
    if types is None:
        use = bool(get(hf, "use_sliding_window", False)) and window is not None
        first = get(hf, "max_window_layers", layers)
        types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(layers)]
    sliding = tuple(t == "sliding_attention" for t in types)
    return dict(sliding_window=window if any(sliding) else None, sliding_layers=sliding)


def _write_layer_windows(cfg: ModelConfig) -> dict:
    return dict(sliding_window=cfg.sliding_window, use_sliding_window=any(cfg.sliding_layers),
                layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers])


# A window on the layers `layer_types` marks `sliding_attention` (older configs: from `max_window_layers` on).
LAYER_WINDOWS = Part(_read_layer_windows, _write_layer_windows)

# ---------------------------------------------------------------------------------------- tensor tables

_LLAMA_TENSORS = (
    rule("lm_head.weight", head=True),
    *renames("embed_tokens.weight", "norm.weight", "layers.{i}.input_layernorm.weight",
             "layers.{i}.post_attention_layernorm.weight",
             *(f"layers.{{i}}.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
               for w in ("weight", "bias")),
             *(f"layers.{{i}}.mlp.{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias"))),
)
_QK_NORM_TENSORS = renames("layers.{i}.self_attn.q_norm.weight", "layers.{i}.self_attn.k_norm.weight")

# ---------------------------------------------------------------------------------------- the families

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, MLP_BIAS, NO_WINDOW), Table(_LLAMA_TENSORS)),
    Family("mistral", "MistralForCausalLM", (*LLAMA_CORE, Part(_refuse_attention_bias), UNIFORM_WINDOW),
           Table(_LLAMA_TENSORS)),
    Family("qwen2", "Qwen2ForCausalLM", (*LLAMA_CORE, fixed(qkv_bias=True), LAYER_WINDOWS), Table(_LLAMA_TENSORS)),
    Family("qwen3", "Qwen3ForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, LAYER_WINDOWS, fixed(qk_norm=True)),
           Table(_LLAMA_TENSORS + _QK_NORM_TENSORS)),
)}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; jaxtune supports {', '.join(FAMILIES)} "
            "(SmolLM/SmolLM2 are model_type 'llama')")
    return FAMILIES[model_type]


def from_hf_config(hf: Any, **runtime: Any) -> ModelConfig:
    """A `transformers.PretrainedConfig` → ModelConfig (`runtime`: scan_layers, remat, attention_impl)."""
    fam = family(get(hf, "model_type"))
    try:
        fields = fam.from_hf(hf)
    except (TypeError, AttributeError, KeyError) as e:  # a field missing or of the wrong type
        raise UnsupportedConfigError(f"model_type={fam.model_type!r}: a config field is missing or malformed ({e})") \
            from None
    return ModelConfig(model_type=fam.model_type, **fields, **runtime)


def nnx_to_hf(model_type: str, path: tuple, layer: int | None = None) -> str:
    """The HF name of an NNX parameter: a per-layer path, or a scanned path plus the layer index."""
    if layer is not None:
        path = (path[0], layer, *path[1:])
    try:
        return family(model_type).tensors.hf_name_of(path)
    except KeyError as e:
        raise KeyError(f"{e.args[0]} in the {model_type} table") from None
