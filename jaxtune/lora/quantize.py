"""QLoRA's frozen base: which weights of a model `lora.quantize` stores quantized, and doing it.

Works on a loaded model and on an abstract one (`nnx.eval_shape`), which is how the loader learns what to
quantize as each checkpoint tensor arrives (`hf.load.load_pretrained(prepare=...)`), so a bf16 copy of the
whole base never exists.
"""

from __future__ import annotations

from flax import nnx

from jaxtune.lora.apply import (
    _expert_modules,
    _expert_param_name,
    _hf_module,
    _layers_of,
    _linear_sites,
    _placed,
    module_targets,
    parameter_targets,
)
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.model.moe import EXPERT_PARAMETERS
from jaxtune.model.quant import QuantSpec, quantize_param


def quantize_sites(model, cfg: LoraConfig) -> list[tuple[str, nnx.Module, str]]:
    """(HF name, module, parameter name) of every weight `cfg.quantize_scope` quantizes in `model`. A stacked (scanned)
    weight is quantized whole when any of its layers is a target."""
    scope = cfg.quantize_scope
    targets = set(module_targets(cfg, model)) if scope == "targets" else None
    expert_targets = set(parameter_targets(cfg, model)) if scope == "targets" else None
    sites = []
    for path, linear, layers in _linear_sites(model):
        if path[0] == "lm_head":
            if scope == "all" and not model.config.tie_word_embeddings:
                sites.append(("lm_head", linear, "weight"))
            continue
        names = [_hf_module(model, path, i) for i in layers]
        if targets is None or any(n in targets for n in names):
            sites.append((names[0], linear, "weight"))
    for path, experts in _expert_modules(model):
        for param in EXPERT_PARAMETERS:
            names = [_expert_param_name(model, path, i, param) for i in _layers_of(model, path)]
            if expert_targets is None or any(n in expert_targets for n in names):
                sites.append((names[0], experts, param))
    if scope == "all":
        sites.append(("model.embed_tokens", model.embed_tokens, "weight"))
    return sites


def quantize_base(model, cfg: LoraConfig, *, rules: dict | None = None):
    """Store the weights `cfg` selects quantized as `cfg.quant_spec()`, in place; returns `model`. A weight that
    cannot take the format is refused naming it (NF4 packs two codes a byte: an odd input size cannot)."""
    spec = cfg.quant_spec()
    if spec is None:
        return model
    for label, module, name in quantize_sites(model, cfg):
        if getattr(module, f"{name}_quant", None) is not None:
            continue
        _check(label, module, name, spec)
        weight = getattr(module, name)
        quantize_param(module, name, spec, place=lambda var, value, weight=weight: _placed(value, var, weight, rules))
    return model


def _check(label: str, module, name: str, spec: QuantSpec) -> None:
    shape = getattr(module, name).shape
    if spec.kind == "nf4" and shape[-1] % 2:
        raise LoraConfigError(f"lora.quantize: nf4 packs two 4-bit codes a byte, but {label} has an odd input "
                              f"size {shape[-1]}; use int8 or a quantize_scope that leaves it out")
