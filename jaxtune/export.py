"""Export back to Hugging Face: merged checkpoints, PEFT adapters, and loading PEFT adapters into jaxtune.

Every directory is written atomically: into a temp dir beside the target, then swapped in by rename, so
an interrupted export leaves the previous output as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.convert.hf_save import (DTYPE_NAMES, Tensor, hf_config_from_model, hf_config_from_source, hf_tensors,
                                     save_weights, write_safetensors)
from jaxtune.lora import LINEAR_NAMES, LoraConfig, LoraConfigError, apply_lora, lora_sites, resolve_targets

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT adapter_config fields that change what the adapter computes and that jaxtune does not implement:
# field → the value meaning "off". Anything else set refuses the load rather than silently diverging.
_UNSUPPORTED = {
    "use_dora": False, "modules_to_save": None, "trainable_token_indices": None, "fan_in_fan_out": False,
    "bias": "none", "lora_bias": False, "use_qalora": False, "layer_replication": None,
    "target_parameters": None, "alora_invocation_tokens": None, "megatron_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "velora_config": None, "monteclora_config": None,
    "ensure_weight_tying": False,
}
# init_lora_weights schemes that also rewrite the base weights: the adapter alone is not the whole model.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


class AdapterError(ValueError):
    """A PEFT adapter directory jaxtune cannot load as written."""


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a fresh temp dir beside `out_dir`; on success it replaces `out_dir` by rename, on any error it
    is deleted and `out_dir` is untouched."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.parent / f".{out.name}.tmp-{tag}", out.parent / f".{out.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_token_ids(model_config, tokenizer=None, chat_template: str | None = None, extra=(),
                   generation: dict | None = None) -> list[int]:
    """Every id generation should stop at: config/generation-config EOS, the tokenizer's EOS, `extra`, and
    the end-of-turn markers the chat template actually emits (e.g. `<|im_end|>` next to `<|endoftext|>`)."""
    from jaxtune.data.chat import END_OF_TURN

    ids = _ids(model_config.eos_token_id) + _ids((generation or {}).get("eos_token_id")) + _ids(extra)
    if tokenizer is not None:
        ids += _ids(tokenizer.eos_token_id)
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = "\n".join(template.values())
        vocab = tokenizer.get_vocab()
        ids += [vocab[m] for m in END_OF_TURN if template and m in template and m in vocab]
    return list(dict.fromkeys(ids))


def _generation_config(model_config, tokenizer, chat_template, extra, source_dir) -> dict:
    gen = {}
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(source_dir) / "generation_config.json").read_text())
    stops = stop_token_ids(model_config, tokenizer, chat_template, extra, gen)
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    bos = model_config.bos_token_id if model_config.bos_token_id is not None else getattr(
        tokenizer, "bos_token_id", None)
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else getattr(
        tokenizer, "pad_token_id", None)
    for key, value in (("bos_token_id", bos), ("pad_token_id", pad)):
        if value is not None:
            gen[key] = int(value)
    return gen


def _save_tokenizer(tokenizer, out: Path, chat_template: str | None) -> None:
    before = tokenizer.chat_template
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = before


def _export_dtype(dtype, source_dir, model):
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        return jnp.dtype(DTYPE_NAMES[dtype])
    if dtype is not None:
        return jnp.dtype(dtype)
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        raw = json.loads((Path(source_dir) / "config.json").read_text())
        name = raw.get("dtype") or raw.get("torch_dtype")
        if name in DTYPE_NAMES:
            return jnp.dtype(DTYPE_NAMES[name])
    return jnp.dtype(model.embed_tokens.weight.dtype)


def save_merged(model, tokenizer, out_dir: str | Path, *, source_dir: str | Path | None = None, dtype=None,
                chat_template: str | None = None, stop_ids=(), max_shard_size: int | str = "5GB") -> Path:
    """Write an HF checkpoint of `model` with any LoRA merged (fp32 math, one cast) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads: safetensors (sharded above `max_shard_size`),
    `config.json` (the source's, with only changed fields rewritten), tokenizer files with `chat_template`
    (the one training used) and `generation_config.json` listing every stop id. `dtype` defaults to the
    source checkpoint's dtype; `tokenizer` may be None."""
    out = Path(out_dir)
    if source_dir is not None and out.resolve() == Path(source_dir).resolve():
        raise ValueError(f"export target {out} is the source model directory; choose a new --out directory")
    dt = _export_dtype(dtype, source_dir, model)
    cfg = model.config
    config = (hf_config_from_source(cfg, Path(source_dir), dt) if source_dir is not None
              else hf_config_from_model(cfg, dt))
    generation = _generation_config(cfg, tokenizer, chat_template, stop_ids, source_dir)
    with atomic_dir(out) as tmp:
        save_weights(hf_tensors(model, dt), tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, chat_template)
    return out


# ---------------------------------------------------------------------------------------------- PEFT out


def peft_config_dict(cfg: LoraConfig, model, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json in PEFT 0.21's format; "all-linear" is written as the names it resolved to."""
    targets = cfg.target_modules
    if targets == "all-linear":
        present = {n.rsplit(".", 1)[-1] for n in resolve_targets(cfg, model)}
        targets = [n for n in LINEAR_NAMES if n in present]
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
    }


def save_peft_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                      tokenizer=None, chat_template: str | None = None) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` that `peft.PeftModel.from_pretrained(base,
    out_dir)` loads with identical logits; the LoRA config is the one `apply_lora` recorded on the model."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora or load_peft_adapter first)")
    tensors = []
    for name, linear, layer in lora_sites(model):
        for part, var in (("lora_A", linear.lora_A), ("lora_B", linear.lora_B)):
            shape = var.shape if layer is None else var.shape[1:]

            def make(var=var, layer=layer):
                return var[...] if layer is None else var[...][layer]

            tensors.append(Tensor(f"{PEFT_PREFIX}{name}.{part}.weight", shape, var.dtype, make))
    config = peft_config_dict(cfg, model, base_model_name_or_path)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, chat_template)
    return Path(out_dir)


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
    if raw.get("target_modules") is None:
        raise AdapterError(f"{source}: target_modules is missing")
    try:
        return LoraConfig(rank=raw.get("r", 8), alpha=raw.get("lora_alpha", 8),
                          dropout=raw.get("lora_dropout", 0.0) or 0.0, target_modules=raw["target_modules"],
                          rslora=bool(raw.get("use_rslora", False)), exclude_modules=raw.get("exclude_modules") or None,
                          layers_to_transform=raw.get("layers_to_transform") or None,
                          layers_pattern=raw.get("layers_pattern") or None,
                          rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {})
    except LoraConfigError as e:
        raise AdapterError(f"{source}: {e}") from None


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    from jaxtune.convert.hf_load import read_safetensors

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        other = sorted(p.name for p in adapter_dir.glob("adapter_model*"))
        hint = f" (found {other}: re-save it with safe_serialization=True)" if other else ""
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    return {name: np.asarray(arr) for name, arr in read_safetensors(path)}


def _put(var, value: np.ndarray) -> None:
    old = var[...]
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(value.astype(var.dtype), sharding) if sharding is not None else jnp.asarray(
        value, var.dtype))


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
    for name, linear, layer in lora_sites(model):
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            var = getattr(linear, part)
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
                           f"under {cfg_path}; only LoRA A/B of {', '.join(LINEAR_NAMES)} are supported")
    return model
