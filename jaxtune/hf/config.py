"""HF config ↔ ModelConfig in parts: the Llama-style translation every family starts from.

A `Part` translates one aspect both ways. `read` takes ModelConfig fields from a `transformers` config object
(never raw JSON: class defaults differ per family, and v5 moved `rope_theta` into `rope_parameters`) and
refuses values jaxtune cannot reproduce; `write` gives the HF config kwargs that read back to those fields.
A family's config translation is a tuple of parts: the shared ones here plus its own where it differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from jaxtune.model.config import ROPE_TYPES, ModelConfig, UnsupportedConfigError


def _nothing(cfg: ModelConfig) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Part:
    read: Callable[[Any], dict]
    write: Callable[[ModelConfig], dict] = _nothing


def fixed(**fields) -> Part:
    """Fields a family always has (e.g. `qk_norm=True`): implied by its model_type, so never written."""
    return Part(lambda hf: dict(fields))


def read_parts(parts: tuple[Part, ...], hf: Any) -> dict:
    fields: dict = {}
    for part in parts:
        got = part.read(hf)
        clash = fields.keys() & got.keys()
        if clash:
            raise ValueError(f"config parts both set {sorted(clash)}: replace a part instead of stacking two")
        fields.update(got)
    return fields


def write_parts(parts: tuple[Part, ...], cfg: ModelConfig) -> dict:
    return {k: v for part in parts for k, v in part.write(cfg).items()}


def get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default)


def layer_types(hf: Any, known: tuple[str, ...] = ("full_attention", "sliding_attention")) -> list[str] | None:
    """HF `layer_types` (one attention type per layer), refusing types the family does not implement."""
    types = get(hf, "layer_types")
    unknown = set(types or ()) - set(known)
    if unknown:
        raise UnsupportedConfigError(f"layer_types contains unsupported {sorted(unknown)}")
    return None if types is None else list(types)


_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")


def _read_dims(hf: Any) -> dict:
    heads, hidden = get(hf, "num_attention_heads"), get(hf, "hidden_size")
    return dict(vocab_size=get(hf, "vocab_size"), hidden_size=hidden, intermediate_size=get(hf, "intermediate_size"),
                num_hidden_layers=get(hf, "num_hidden_layers"), num_attention_heads=heads,
                num_key_value_heads=get(hf, "num_key_value_heads") or heads,
                head_dim=get(hf, "head_dim") or hidden // heads, rms_norm_eps=float(get(hf, "rms_norm_eps", 1e-6)),
                max_position_embeddings=get(hf, "max_position_embeddings", 2048),
                tie_word_embeddings=bool(get(hf, "tie_word_embeddings", False)))


DIMS = Part(_read_dims, lambda cfg: {f: getattr(cfg, f) for f in _DIMS})


def _read_tokens(hf: Any) -> dict:
    eos = get(hf, "eos_token_id")
    return dict(bos_token_id=get(hf, "bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=get(hf, "pad_token_id"))


def _write_tokens(cfg: ModelConfig) -> dict:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)


TOKENS = Part(_read_tokens, _write_tokens)


def _read_silu(hf: Any) -> dict:
    act = get(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    if (get(hf, "pretraining_tp", 1) or 1) != 1:
        raise UnsupportedConfigError("pretraining_tp != 1 is not supported")
    return {}


# A SwiGLU MLP computed in one piece (no tensor-parallel slicing of the reference implementation).
SILU_MLP = Part(_read_silu, lambda cfg: {"hidden_act": "silu"})


def rope_params(hf: Any, layer_type: str | None = None) -> dict:
    """The RoPE settings as one dict, from v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`. Families
    with a RoPE per attention type (Gemma 3) have them nested by layer type: `layer_type` picks one."""
    params = dict(get(hf, "rope_parameters") or {})
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested and layer_type is None:
        raise UnsupportedConfigError(f"rope_parameters is set per layer type ({', '.join(nested)}); this family "
                                     "has one RoPE for every layer")
    if nested:
        if layer_type not in params:
            raise UnsupportedConfigError(f"rope_parameters has no entry for layer type {layer_type!r}")
        params = dict(params[layer_type])
    else:
        scaling = get(hf, "rope_scaling")
        if scaling and scaling is not get(hf, "rope_parameters"):
            params.update(scaling)
        if "rope_theta" not in params and get(hf, "rope_theta") is not None:
            params["rope_theta"] = get(hf, "rope_theta")
    params.setdefault("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _longrope(params: dict, hf: Any) -> dict:
    """longrope's factors and its cos/sin factor, defaulted as transformers does: from `factor`, else from
    max_position_embeddings / original_max_position_embeddings."""
    original = params.get("original_max_position_embeddings") or get(hf, "original_max_position_embeddings")
    factor = params.get("factor") or get(hf, "max_position_embeddings") / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(rope_short_factor=tuple(map(float, params["short_factor"])),
                rope_long_factor=tuple(map(float, params["long_factor"])), rope_factor=float(factor),
                rope_original_max_position=int(original), rope_attention_factor=float(attention))


def rope_fields(params: dict, hf: Any = None, *, partial: bool = False) -> dict:
    """ModelConfig rope fields from one `rope_params` dict, refusing scalings the model does not implement
    (and a partial rotary factor unless the family rotates part of each head, `partial`)."""
    rtype = params["rope_type"]
    if rtype in ("su", "yarn") and partial:  # Phi-3's old names for longrope, as transformers maps them
        rtype = "longrope"
    if rtype not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope_scaling/rope_parameters rope_type={rtype!r} is not supported; expected one of {ROPE_TYPES}")
    fraction = float(params.get("partial_rotary_factor", 1.0))
    if fraction != 1.0 and not partial:
        raise UnsupportedConfigError("rope partial_rotary_factor != 1 is not supported for this family")
    fields = dict(rope_theta=float(params["rope_theta"]), rope_type=rtype,
                  rope_factor=float(params.get("factor", 1.0)),
                  rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                  rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                  rope_original_max_position=int(params.get("original_max_position_embeddings", 8192)))
    if partial:
        fields["partial_rotary_factor"] = fraction
    if rtype == "longrope":
        fields.update(_longrope(params, hf))
    return fields


def rope_parameters(cfg: ModelConfig) -> dict:
    """The inverse of `rope_fields`: one `rope_parameters` dict."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3", "longrope"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    if cfg.rope_type == "longrope":
        rope.pop("factor")
        rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
                    original_max_position_embeddings=cfg.rope_original_max_position)
        derived = _longrope(rope, cfg)  # written only where they differ from what transformers derives
        for key, field in (("factor", "rope_factor"), ("attention_factor", "rope_attention_factor")):
            if derived[field] != getattr(cfg, field):
                rope[key] = getattr(cfg, field)
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    return rope


ROPE = Part(lambda hf: rope_fields(rope_params(hf)), lambda cfg: {"rope_parameters": rope_parameters(cfg)})
# RoPE over the first `partial_rotary_factor` of each head, with longrope (Phi-3 / Phi-4-mini).
def _write_partial_rope(cfg: ModelConfig) -> dict:
    out = {"rope_parameters": {"partial_rotary_factor": 1.0, **rope_parameters(cfg)}}
    if cfg.rope_type == "longrope":
        out["original_max_position_embeddings"] = cfg.rope_original_max_position
    return out


PARTIAL_ROPE = Part(lambda hf: rope_fields(rope_params(hf), hf, partial=True), _write_partial_rope)

# The MLP activations a family may name (`hidden_act` or Gemma 2/3's `hidden_activation`) → ModelConfig's.
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def activation(field: str) -> Part:
    """The gate activation read from `field`, refusing any other."""

    def read(hf: Any) -> dict:
        act = get(hf, field, "silu")
        if act not in HF_ACTIVATIONS:
            raise UnsupportedConfigError(f"{field}={act!r} is not supported; expected one of {sorted(HF_ACTIVATIONS)}")
        return {"hidden_act": HF_ACTIVATIONS[act]}

    names = {ours: hf for hf, ours in HF_ACTIVATIONS.items() if hf != "swish"}
    return Part(read, lambda cfg: {field: names[cfg.hidden_act]})

# What every Llama-style family shares; a family adds its bias and sliding-window parts.
LLAMA_CORE = (DIMS, TOKENS, SILU_MLP, ROPE)
