"""jaxtune → HF: tensors under HF names (the family's tensor table, run backwards), safetensors shards, config.

Tensors are produced one at a time (a scanned stack is sliced per layer on device) and LoRA adapters are
folded in fp32 with a single cast, so exporting never holds a second host copy of the whole model. On a
multi-process job each tensor is gathered onto the host when it is written (`host_array`) and released after.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.families import family, from_hf_config
from jaxtune.hf.safetensors import Tensor, write_safetensors
from jaxtune.hf.tensors import hf_outputs
from jaxtune.model.config import ModelConfig, dtype_name
from jaxtune.model.quant import dequantize, is_companion, part_names

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """`5GB` (10⁹), `500MiB` (2²⁰) or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _adapters(model) -> dict[tuple, tuple]:
    """NNX path of each adapted weight → (lora_A, lora_B, scale, merge function): Linear adapters, and the MoE
    experts' PEFT-layout ones, which `moe.merged_expert_weight` folds into every expert's slice."""
    from jaxtune.model.layers import merged_weight
    from jaxtune.model.moe import EXPERT_PARAMETERS, Experts, merged_expert_weight

    out = {}
    for path, node in nnx.iter_graph(model):
        if getattr(node, "lora_A", None) is not None:
            out[(*path, "weight")] = (node.lora_A, node.lora_B, node.lora_scale, merged_weight)
        elif isinstance(node, Experts):
            for name in EXPERT_PARAMETERS:
                lora_a = getattr(node, f"{name}_lora_A")
                if lora_a is not None:
                    out[(*path, name)] = (lora_a, getattr(node, f"{name}_lora_B"), getattr(node, f"{name}_lora_scale"),
                                          merged_expert_weight)
    return out


def host_array(x) -> np.ndarray:
    """`x` whole on this host. An array sharded over several processes is gathered (`process_allgather`, a
    collective: every process must call this for the same arrays in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_tensors(model, dtype=None) -> list[Tensor]:
    """Every weight of `model` under its HF name, LoRA merged (fp32 math, one cast to `dtype` or the
    parameter's own dtype; fp32 for a quantized one, which is dequantized first). A tied head has no
    `lm_head.weight`, as in HF checkpoints. Each tensor comes to the host whole (`host_array`) only when it is
    read, so a multi-process job holds one at a time."""
    cfg: ModelConfig = model.config
    adapters = _adapters(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    entries = []
    for path, var in flat.items():
        if isinstance(var, nnx.LoRAParam) or is_companion(var):
            continue
        lora = adapters.get(path)
        spec = var.get_metadata().get("quant")
        parts = {"weight": var} if spec is None else {
            "weight": var, **{p: flat[(*path[:-1], f"{path[-1]}_{p}")] for p in part_names(spec)}}
        out_dtype = dtype or (jnp.float32 if spec is not None else var.dtype)
        stack = cfg.layer_stacks.get(path[0])
        for j, layer in (enumerate(stack) if stack else [(None, None)]):
            def make(parts=parts, spec=spec, lora=lora, j=j, out_dtype=out_dtype):
                take = (lambda x: x) if j is None else (lambda x: x[j])
                values = {p: take(v[...]) for p, v in parts.items()}
                w = values["weight"] if spec is None else dequantize(values, spec, jnp.float32)
                if lora is None:
                    return w.astype(out_dtype)
                lora_a, lora_b, scale, merge = lora
                return merge(w, take(lora_a[...]), take(lora_b[...]), scale, out_dtype)

            shape = var.shape[1:] if stack else var.shape
            if spec is not None:
                shape = (*shape[:-1], shape[-1] * (2 if spec.kind == "nf4" else 1))
            per_layer = path if layer is None else ("layers", layer, *path[1:])
            entries.append((per_layer, make, jax.ShapeDtypeStruct(shape, out_dtype)))
    # Gathered after the family's transform, per HF tensor: a rule's outputs (e.g. one layer's experts) stay
    # sharded on the devices until each is written.
    return [t.then(host_array) for t in hf_outputs(family(cfg.model_type).tensors, entries, cfg)]


def save_weights(tensors: list[Tensor], out_dir: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when the
    total exceeds `max_shard_size` (greedy, in order; a tensor larger than the limit gets its own shard)."""
    limit = parse_size(max_shard_size)
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def hf_config_from_model(cfg: ModelConfig, dtype) -> dict:
    """A `config.json` dict for a model that has no source directory, verified by reading it back."""
    from transformers import AutoConfig

    fam = family(cfg.model_type)
    if fam.text_config:
        raise ValueError(f"a {cfg.model_type} model is the text tower of a multimodal checkpoint: export it with "
                         "the source model directory (source_dir), whose config and vision tower it keeps")
    hf = AutoConfig.for_model(cfg.model_type, **fam.to_hf(cfg))
    hf.architectures = [fam.architecture]
    hf.dtype = dtype_name(dtype)
    back = from_hf_config(hf, **{f: getattr(cfg, f) for f in _RUNTIME})
    if back != cfg:
        diff = {f: (getattr(cfg, f), getattr(back, f)) for f in cfg.__dataclass_fields__
                if getattr(cfg, f) != getattr(back, f)}
        raise ValueError(f"cannot express this model as an HF {cfg.model_type} config (model vs HF): {diff}")
    return hf.to_diff_dict()


# ModelConfig fields export may legitimately change (vocab resize, new special tokens) → config.json keys.
_UPDATABLE = {"vocab_size": "vocab_size", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "pad_token_id": "pad_token_id"}
_RUNTIME = ("scan_layers", "remat", "attention_impl", "generation_eos_token_id")


def hf_config_from_source(cfg: ModelConfig, source_dir: Path, dtype) -> dict:
    """The source `config.json` with every original field kept but a quantization_config; only vocab size,
    special-token ids (when the model's differ) and dtype are rewritten. Any other difference means the model
    is not that checkpoint."""
    from jaxtune.hf.load import load_hf_config

    path = Path(source_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: source_dir must be the HF model directory the model came from")
    raw = json.loads(path.read_text())
    raw.pop("quantization_config", None)  # a merged export holds float weights, even from a 4-bit source
    src = from_hf_config(load_hf_config(source_dir), **{f: getattr(cfg, f) for f in _RUNTIME})
    for field in cfg.__dataclass_fields__:
        ours, theirs = getattr(cfg, field), getattr(src, field)
        if ours == theirs:
            continue
        if field not in _UPDATABLE:
            raise ValueError(f"{path}: {field}={theirs!r} but the exported model has {field}={ours!r}; "
                             "pass the source_dir the model was loaded from")
        target = raw["text_config"] if family(cfg.model_type).text_config else raw
        target[_UPDATABLE[field]] = list(ours) if isinstance(ours, tuple) else ours
    keys = [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]
    for k in keys:
        raw[k] = dtype_name(dtype)
    return raw


def save_tokenizer(tokenizer, out: Path, chat_template: str | None) -> None:
    """The tokenizer's files in `out`, with `chat_template` (the one training used) in place of its own."""
    before = tokenizer.chat_template
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = before
