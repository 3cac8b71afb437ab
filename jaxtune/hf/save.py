"""jaxtune → HF: tensors under HF names (the loader's mapping table, inverted), safetensors shards, config.

Tensors are produced one at a time (a scanned stack is sliced per layer on device) and LoRA adapters are
folded in fp32 with a single cast, so exporting never holds a second host copy of the whole model.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxtune.hf.families import nnx_to_hf
from jaxtune.model.config import ModelConfig, dtype_name, from_hf_config

_ST_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class Tensor:
    """An output tensor known by name, shape and dtype before its bytes are computed."""

    __slots__ = ("name", "shape", "dtype", "_make")

    def __init__(self, name: str, shape: tuple, dtype, make: Callable[[], jax.Array]):
        self.name, self.shape, self.dtype, self._make = name, tuple(shape), np.dtype(dtype), make

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        arr = np.asarray(jax.device_get(self._make()))
        assert arr.shape == self.shape and arr.dtype == self.dtype, (self.name, arr.shape, arr.dtype)
        return arr


def parse_size(size: int | str) -> int:
    """`5GB` (10⁹), `500MiB` (2²⁰) or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '500MiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def hf_tensors(model, dtype=None) -> list[Tensor]:
    """Every weight of `model` under its HF name, LoRA merged (fp32 math, one cast to `dtype` or the
    parameter's own dtype). A tied head has no `lm_head.weight`, as in HF checkpoints."""
    from jaxtune.lora.apply import merged_weight

    cfg: ModelConfig = model.config
    adapters = {}
    for path, node in nnx.iter_graph(model):
        if getattr(node, "lora_A", None) is not None:
            adapters[(*path, "weight")] = node
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "lora_A" in path or "lora_B" in path:
            continue
        lin = adapters.get(path)
        out_dtype = dtype or var.dtype
        stacked = cfg.scan_layers and path[0] == "layers"
        for layer in (range(cfg.num_hidden_layers) if stacked else [None]):
            def make(var=var, lin=lin, layer=layer, out_dtype=out_dtype):
                take = (lambda x: x) if layer is None else (lambda x: x[layer])
                w = take(var[...])
                if lin is None:
                    return w.astype(out_dtype)
                return merged_weight(w, take(lin.lora_A[...]), take(lin.lora_B[...]), lin.lora_scale, out_dtype)

            shape = var.shape[1:] if stacked else var.shape
            out.append(Tensor(nnx_to_hf(cfg.model_type, path, layer), shape, out_dtype, make))
    return out


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict | None = None) -> None:
    """Stream `tensors` into one safetensors file (header first from shapes, then bytes tensor by tensor)."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for t in tensors:
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"{path}: tensor {t.name} has dtype {t.dtype} that safetensors export does not support")
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            f.write(np.ascontiguousarray(t.numpy()).tobytes())


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


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    return rope


def hf_config_from_model(cfg: ModelConfig, dtype) -> dict:
    """A `config.json` dict for a model that has no source directory, verified by reading it back."""
    from transformers import AutoConfig

    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id, hidden_act="silu",
              rope_parameters=_rope_parameters(cfg))
    layer_types = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
    if cfg.model_type == "llama":
        kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "mistral":
        kw.update(sliding_window=cfg.sliding_window)
    elif cfg.model_type == "qwen2":
        kw.update(sliding_window=cfg.sliding_window, use_sliding_window=any(cfg.sliding_layers),
                  layer_types=layer_types)
    elif cfg.model_type == "qwen3":
        kw.update(attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                  use_sliding_window=any(cfg.sliding_layers), layer_types=layer_types)
    hf = AutoConfig.for_model(cfg.model_type, **kw)
    hf.architectures = [type(hf).__name__.replace("Config", "ForCausalLM")]
    hf.dtype = dtype_name(dtype)
    runtime = dict(scan_layers=cfg.scan_layers, remat=cfg.remat, attention_impl=cfg.attention_impl)
    back = from_hf_config(hf, **runtime)
    if back != cfg:
        diff = {f: (getattr(cfg, f), getattr(back, f)) for f in cfg.__dataclass_fields__
                if getattr(cfg, f) != getattr(back, f)}
        raise ValueError(f"cannot express this model as an HF {cfg.model_type} config (model vs HF): {diff}")
    return hf.to_diff_dict()


# ModelConfig fields export may legitimately change (vocab resize, new special tokens) → config.json keys.
_UPDATABLE = {"vocab_size": "vocab_size", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "pad_token_id": "pad_token_id"}
_RUNTIME = ("scan_layers", "remat", "attention_impl")


def hf_config_from_source(cfg: ModelConfig, source_dir: Path, dtype) -> dict:
    """The source `config.json` with every original field kept; only vocab size, special-token ids (when the
    model's differ) and dtype are rewritten. Any other difference means the model is not that checkpoint."""
    from jaxtune.hf.load import load_hf_config

    path = Path(source_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: source_dir must be the HF model directory the model came from")
    raw = json.loads(path.read_text())
    src = from_hf_config(load_hf_config(source_dir), **{f: getattr(cfg, f) for f in _RUNTIME})
    for field in cfg.__dataclass_fields__:
        ours, theirs = getattr(cfg, field), getattr(src, field)
        if ours == theirs:
            continue
        if field not in _UPDATABLE:
            raise ValueError(f"{path}: {field}={theirs!r} but the exported model has {field}={ours!r}; "
                             "pass the source_dir the model was loaded from")
        raw[_UPDATABLE[field]] = list(ours) if isinstance(ours, tuple) else ours
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
