"""Load an HF causal-LM directory into the NNX Transformer: abstract model, then stream tensors in.

Only safetensors by default (pickle `.bin` needs `allow_pickle=True`); remote code is never executed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf.families import family, from_hf_config
from jaxtune.hf.safetensors import CheckpointError, read_safetensors
from jaxtune.hf.tensors import Gather
from jaxtune.model.config import ModelConfig
from jaxtune.model.sharding import variable_sharding
from jaxtune.model.transformer import Transformer


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


def _model_path(path: tuple, scanned: bool) -> tuple[tuple, int | None]:
    """A per-layer NNX path → (the model's path, the layer index when that leaf is a stack of layers)."""
    if scanned and len(path) > 1 and isinstance(path[1], int):
        return (path[0], *path[2:]), path[1]
    return path, None


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
    filled = _fill(model_dir, cfg, flat, allow_pickle, lambda var: (
        variable_sharding(var, mesh, rules) if mesh is not None else None))
    for p, var in flat.items():
        var.set_value(filled[p]) if hasattr(var, "set_value") else setattr(var, "value", filled[p])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _fill(model_dir: Path, cfg: ModelConfig, flat: dict, allow_pickle: bool, sharding_of) -> dict[tuple, jax.Array]:
    """Every parameter of `flat` from the checkpoint, through the family's tensor table (transforms run on the
    host, per rule as soon as its tensors are read; scanned layers are stacked at the end)."""
    fam = family(cfg.model_type)
    table, gather = fam.tensors, Gather(fam.tensors, cfg, str(model_dir))
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    filled: dict[tuple, jax.Array] = {}

    def place(path, arr):
        var = flat[path]
        want = tuple(var.shape)
        if tuple(arr.shape) != want:
            raise CheckpointError(f"tensor for {'/'.join(map(str, path))}: shape {tuple(arr.shape)}, "
                                  f"model config expects {want}")
        arr = np.asarray(arr).astype(var.dtype)
        sharding = sharding_of(var)
        filled[path] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)

    def put(pairs):
        for nnx_path, arr in pairs:
            p, layer = _model_path(nnx_path, cfg.scan_layers)
            if layer is None:
                place(p, arr)
            else:
                stacked.setdefault(p, {})[layer] = np.asarray(arr)

    for file, name, arr in _iter_tensors(weight_files(model_dir, allow_pickle)):
        hit = table.match_hf(name)
        paths = [] if hit is None else table.nnx_paths(hit.rule, hit.layer)
        targets = [_model_path(p, cfg.scan_layers)[0] for p in paths]
        if hit is None or not all(t in flat for t in targets):
            tied_head = targets and cfg.tie_word_embeddings and all(t[0] == "lm_head" for t in targets)
            if fam.ignores(name) or tied_head:
                continue
            raise CheckpointError(f"{file}: tensor {name!r} has no place in a {cfg.model_type} model with this "
                                  "config (unsupported architecture variant or mismatched config.json)")
        put(gather.add(hit, arr))
    put(gather.finish())
    for p, per_layer in stacked.items():
        if sorted(per_layer) != list(range(cfg.num_hidden_layers)):
            raise CheckpointError(f"{model_dir}: {'/'.join(map(str, p))} found for layers {sorted(per_layer)}, "
                                  f"expected 0..{cfg.num_hidden_layers - 1}")
        place(p, np.stack([per_layer[i] for i in range(cfg.num_hidden_layers)]))
    missing = [p for p in flat if p not in filled]
    if missing:
        names = ", ".join("/".join(map(str, p)) for p in missing[:5])
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the config needs: {names}")
    return filled


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
