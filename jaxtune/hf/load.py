"""Load an HF causal-LM directory into the NNX Transformer: abstract model, then stream tensors in.

Only safetensors by default (pickle `.bin` needs `allow_pickle=True`); remote code is never executed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxtune.hf.families import IGNORED_HF, hf_to_nnx
from jaxtune.model.config import ModelConfig, from_hf_config
from jaxtune.model.sharding import variable_sharding
from jaxtune.model.transformer import Transformer

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A model directory we cannot load, with the file and tensor named."""


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` from one safetensors file via a read-only memmap (bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        yield name, mm[base + start: base + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: sharded index, single safetensors, or (opt-in) pickle."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) {missing} that are not in {model_dir}")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{model_dir} has only pickle weights ({pickles[0].name}); pickle can execute code on load. "
            "Convert them to safetensors, or pass allow_pickle=True if you trust the source.")
    if pickles:
        return pickles
    raise CheckpointError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model*.bin")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, np.ndarray]]:
    for f in files:
        if f.suffix == ".safetensors":
            for name, arr in read_safetensors(f):
                yield f, name, arr
        else:
            import torch

            for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield f, name, t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


def load_config(model_dir: str | Path, **runtime) -> ModelConfig:
    return from_hf_config(load_hf_config(model_dir), **runtime)


def load_pretrained(path: str | Path, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype=None, allow_pickle: bool = False, rules: dict | None = None,
                    **runtime) -> Transformer:
    """Build the model abstractly, then fill each parameter from the checkpoint in `param_dtype` (default
    `dtype`), placed with the mesh's sharding rules. `runtime` sets ModelConfig options (scan_layers, remat…)."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory (expected an HF model dir with config.json)")
    cfg = load_config(model_dir, **runtime)
    param_dtype = param_dtype or dtype
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    filled: dict[tuple, jax.Array] = {}

    def place(path, arr):
        var = flat[path]
        want = tuple(var.shape)
        if tuple(arr.shape) != want:
            raise CheckpointError(f"tensor for {'/'.join(map(str, path))}: shape {tuple(arr.shape)}, "
                                  f"model config expects {want}")
        arr = np.asarray(arr).astype(var.dtype)
        sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
        filled[path] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)

    for file, name, arr in _iter_tensors(weight_files(model_dir, allow_pickle)):
        hit = hf_to_nnx(cfg.model_type, name, cfg.scan_layers)
        if hit is None or hit[0] not in flat:
            if IGNORED_HF.match(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            raise CheckpointError(f"{file}: tensor {name!r} has no place in a {cfg.model_type} model with this "
                                  "config (unsupported architecture variant or mismatched config.json)")
        path, layer = hit
        if layer is None:
            place(path, arr)
        else:
            stacked.setdefault(path, {})[layer] = np.asarray(arr)
    for path, per_layer in stacked.items():
        if sorted(per_layer) != list(range(cfg.num_hidden_layers)):
            raise CheckpointError(f"{model_dir}: {'/'.join(map(str, path))} found for layers {sorted(per_layer)}, "
                                  f"expected 0..{cfg.num_hidden_layers - 1}")
        place(path, np.stack([per_layer[i] for i in range(cfg.num_hidden_layers)]))
    missing = [p for p in flat if p not in filled]
    if missing:
        names = ", ".join("/".join(map(str, p)) for p in missing[:5])
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the config needs: {names}")
    for path, var in flat.items():
        var.set_value(filled[path]) if hasattr(var, "set_value") else setattr(var, "value", filled[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
