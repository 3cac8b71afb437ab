"""PEFT adapter directories: write one `peft` loads with identical logits, and load one onto a model.

Linear adapters sit at `<module>.lora_A.weight`; expert tensors (`target_parameters`) at their experts module,
where PEFT nests one ParamWrapper per targeted tensor in `EXPERT_PARAMETERS` order, so with both tensors
targeted `gate_up_proj`'s keys are `<experts>.base_layer.lora_A.weight` and `down_proj`'s `<experts>.lora_A.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.files import as_path, atomic_dir
from jaxtune.hf.safetensors import Tensor, write_safetensors
from jaxtune.hf.save import save_tokenizer
from jaxtune.lora.apply import (
    apply_lora,
    expert_lora_sites,
    linear_names,
    lora_sites,
    module_targets,
)
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.model.moe import EXPERT_PARAMETERS

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT adapter_config fields that change what the adapter computes and that jaxtune does not implement:
# field → the value meaning "off". Anything else set refuses the load rather than silently diverging.
_UNSUPPORTED = {
    "use_dora": False, "modules_to_save": None, "trainable_token_indices": None, "fan_in_fan_out": False,
    "bias": "none", "lora_bias": False, "use_qalora": False, "layer_replication": None,
    "alora_invocation_tokens": None, "megatron_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None,
    "ensure_weight_tying": False,
}
# init_lora_weights schemes that also rewrite the base weights: the adapter alone is not the whole model.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


class AdapterError(ValueError):
    """A PEFT adapter directory jaxtune cannot load as written."""


# ---------------------------------------------------------------------------------------------- PEFT out


def _adapter_keys(model):
    """(PEFT state-dict key prefix, what it adapts, layer or None, {"lora_A": variable, "lora_B": variable})
    for every adapter of `model`: Linear ones, then expert tensors under PEFT's ParamWrapper nesting (a tensor
    sits one `base_layer.` deeper for each tensor of the same module targeted after it)."""
    for name, linear, layer in lora_sites(model):
        yield f"{PEFT_PREFIX}{name}.", name, layer, {"lora_A": linear.lora_A, "lora_B": linear.lora_B}
    experts = list(expert_lora_sites(model))
    for name, module, param, layer in experts:
        later = [p for _, m, p, i in experts if m is module and i == layer and
                 EXPERT_PARAMETERS.index(p) > EXPERT_PARAMETERS.index(param)]
        prefix = f"{PEFT_PREFIX}{name.rsplit('.', 1)[0]}.{'base_layer.' * len(later)}"
        yield prefix, name, layer, {part: getattr(module, f"{param}_{part}") for part in ("lora_A", "lora_B")}


def peft_config_dict(cfg: LoraConfig, model, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json in PEFT 0.21's format; "all-linear" is written as the names it resolved to."""
    targets = cfg.target_modules
    if targets == "all-linear":
        present = {n.rsplit(".", 1)[-1] for n in module_targets(cfg, model)}
        targets = [n for n in linear_names(model) if n in present]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "exclude_modules": cfg.exclude_modules if isinstance(cfg.exclude_modules, (str, type(None)))
        else list(cfg.exclude_modules),
        "layers_to_transform": None if cfg.layers_to_transform is None else list(cfg.layers_to_transform),
        "layers_pattern": None if cfg.layers_pattern is None else list(cfg.layers_pattern),
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "init_lora_weights": True, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
        "use_dora": False, "lora_bias": False,
        "target_parameters": None if cfg.target_parameters is None else list(cfg.target_parameters),
    }


def save_peft_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                      tokenizer=None, chat_template: str | None = None, force: bool = False,
                      protect: dict[str, str | Path | None] | None = None) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` that `peft.PeftModel.from_pretrained(base,
    out_dir)` loads with identical logits; the LoRA config is the one `apply_lora` recorded on the model.
    The target is guarded as in `jaxtune.files.atomic_dir` (`force`, `protect`); a local base model dir is
    protected too."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora or load_peft_adapter first)")
    tensors = []
    for prefix, _, layer, parts in _adapter_keys(model):
        for part, var in parts.items():
            shape = var.shape if layer is None else var.shape[1:]

            def make(var=var, layer=layer):
                return var[...] if layer is None else var[...][layer]

            tensors.append(Tensor(f"{prefix}{part}.weight", shape, var.dtype, make))
    config = peft_config_dict(cfg, model, base_model_name_or_path)
    base = base_model_name_or_path
    guarded = {"the base model directory": base if base and Path(base).is_dir() else None, **(protect or {})}
    with atomic_dir(out_dir, kind="peft-adapter", force=force, protect=guarded) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, chat_template)
    return as_path(out_dir)


# ---------------------------------------------------------------------------------------------- PEFT in


def lora_config_from_peft(raw: dict, source: str = ADAPTER_CONFIG) -> LoraConfig:
    """Our LoraConfig for a PEFT adapter_config dict, refusing every option that would change the result."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}: peft_type={raw.get('peft_type')!r}; only LoRA adapters can be loaded")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{source}: task_type={raw['task_type']!r}; only CAUSAL_LM adapters can be loaded")
    for field, off in _UNSUPPORTED.items():
        value = raw.get(field, off)
        if value != off and not (off is None and value in ([], {}, "")):
            raise AdapterError(f"{source}: {field}={value!r} is not supported by jaxtune (only {field}={off!r}); "
                               "merge this adapter with peft (merge_and_unload) and load the merged model instead")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"{source}: init_lora_weights={init!r} also rewrites the base weights, so the adapter "
                           "alone does not reproduce the model; merge it with peft and load the merged model")
    parameters = raw.get("target_parameters") or None
    if raw.get("target_modules") is None and not parameters:
        raise AdapterError(f"{source}: target_modules is missing")
    modules = raw.get("target_modules")
    try:
        return LoraConfig(rank=raw.get("r", 8), alpha=raw.get("lora_alpha", 8),
                          dropout=raw.get("lora_dropout", 0.0) or 0.0,
                          target_modules=() if modules is None else modules,
                          target_parameters=parameters,
                          rslora=bool(raw.get("use_rslora", False)), exclude_modules=raw.get("exclude_modules") or None,
                          layers_to_transform=raw.get("layers_to_transform") or None,
                          layers_pattern=raw.get("layers_pattern") or None,
                          rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {})
    except LoraConfigError as e:
        raise AdapterError(f"{source}: {e}") from None


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    from jaxtune.hf.safetensors import read_safetensors

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        other = sorted(p.name for p in adapter_dir.glob("adapter_model*"))
        hint = f" (found {other}: re-save it with safe_serialization=True)" if other else ""
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    return {name: np.asarray(arr) for name, arr in read_safetensors(path)}


def _put(var, value: np.ndarray) -> None:
    """Keep a mesh placement `apply_lora` gave the leaf; otherwise stay uncommitted as `apply_lora`'s leaves are, so
    the loaded model traces to the same program as a freshly adapted one (no recompilation)."""
    sharding = getattr(var[...], "sharding", None)
    var.set_value(jax.device_put(value.astype(var.dtype), sharding) if isinstance(
        sharding, jax.sharding.NamedSharding) else jnp.asarray(value, var.dtype))


def load_peft_adapter(model, adapter_dir: str | Path):
    """`model` with the PEFT LoRA adapter in `adapter_dir` attached (a new model sharing the base arrays;
    the input is untouched, also on error), so training can continue from adapters made with PEFT/TRL.
    Works in both layouts; errors name the file, the tensor or the config field."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    raw = json.loads(cfg_path.read_text())
    cfg = lora_config_from_peft(raw, str(cfg_path))
    tensors = _read_adapter_tensors(adapter_dir)
    model = nnx.clone(model)
    try:
        apply_lora(model, cfg)
    except LoraConfigError as e:
        raise AdapterError(f"{cfg_path}: {e}") from None
    weights = adapter_dir / ADAPTER_WEIGHTS
    used = set()
    stacks: dict[int, tuple] = {}
    for prefix, name, layer, parts in _adapter_keys(model):
        for part, var in parts.items():
            key = f"{prefix}{part}.weight"
            if key not in tensors:
                raise AdapterError(f"{weights}: tensor {key!r} is missing but {cfg_path} targets {name}")
            arr = tensors[key]
            want = var.shape if layer is None else var.shape[1:]
            if tuple(arr.shape) != tuple(want):
                raise AdapterError(f"{weights}: {key} has shape {tuple(arr.shape)}, expected {tuple(want)} from "
                                   f"{cfg_path} (r / rank_pattern) and the model; adapter and config disagree "
                                   "or the adapter belongs to another base model")
            used.add(key)
            if layer is None:
                _put(var, arr)
            else:
                stacks.setdefault(id(var), (var, {}))[1][layer] = arr
    for var, per_layer in stacks.values():
        value = np.array(var[...])
        for layer, arr in per_layer.items():
            value[layer] = arr
        _put(var, value)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise AdapterError(f"{weights}: tensor {unknown[0]!r} ({len(unknown)} unused) has no place in this model "
                           f"under {cfg_path}; only LoRA A/B of {', '.join(linear_names(model))} and of the MoE "
                           f"expert tensors ({', '.join(EXPERT_PARAMETERS)}) are supported")
    return model
