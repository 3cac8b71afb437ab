"""Load an HF causal-LM directory into the NNX Transformer: abstract model, then stream tensors in.

Only safetensors by default (pickle `.bin` needs `allow_pickle=True`); remote code is never executed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.hf import bnb
from jaxtune.hf.families import Family, family, from_hf_config
from jaxtune.hf.safetensors import CheckpointError, Tensor, read_header, read_safetensors
from jaxtune.hf.tensors import Gather
from jaxtune.model.config import ModelConfig, UnsupportedConfigError
from jaxtune.model.quant import quantize_weight
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


def _refuse_integer(fam: Family, file: Path, name: str, dtype) -> None:
    """An integer or bool tensor where a float weight belongs: casting it would load garbage without a word."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iub" and not fam.ignores(name):
        raise CheckpointError(f"{file}: tensor {name!r} is {dtype.name} where a float weight belongs; "
                              "re-export the checkpoint with floating-point weights")


def weight_headers(model_dir: Path, fam: Family, allow_pickle: bool = False) -> dict[Path, dict | None]:
    """Each weight file's tensors as {name: (dtype, shape)} (None for pickle files, which have no header),
    opening every safetensors file once: a truncated or corrupt file, or an integer weight, fails here,
    before any tensor bytes are read."""
    out: dict[Path, dict | None] = {}
    for f in weight_files(model_dir, allow_pickle):
        out[f] = read_header(f) if f.suffix == ".safetensors" else None
    quantized = bnb.quantized_names(name for header in out.values() for name in header or {})
    for f, header in out.items():
        for name, (dtype, _) in (header or {}).items():
            if name not in quantized:
                _refuse_integer(fam, f, name, dtype)
    return out


def nonfinite_counts(model_dir: Path, fam: Family, chunk: int = 1 << 24) -> Iterator[tuple[Path, str, int, int]]:
    """(file, tensor, NaN count, Inf count) for every tensor, read one tensor (and `chunk` values) at a time."""
    weight_headers(model_dir, fam)
    for file, name, arr in _iter_tensors(weight_files(model_dir)):
        flat, nan, inf = arr.reshape(-1), 0, 0
        if flat.dtype.kind not in "iub":
            for i in range(0, flat.size, chunk):
                part = flat[i: i + chunk]
                nan, inf = nan + int(np.isnan(part).sum()), inf + int(np.isinf(part).sum())
        yield file, name, nan, inf


def load_hf_config(model_dir: str | Path):
    """The `transformers` config of an HF model dir. A missing dir or config.json, invalid JSON or a model_type
    without a jaxtune family is refused here, naming the file, before `transformers` parses it (its errors for
    unknown model types span paragraphs). Remote code is never run."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "not a directory" if model_dir.exists() else "no such directory"
        raise CheckpointError(f"{model_dir}: {what} (expected an HF model dir with config.json)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected an HF model dir with config.json)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        family(raw.get("model_type") if isinstance(raw, dict) else None)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 — its failures on a bad file come in many classes, some bare Exception
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: transformers cannot read it: {reason}") from None


def generation_eos(model_dir: str | Path) -> tuple[int, ...]:
    """The stop ids `generation_config.json` lists (none when it is absent or names none)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid generation config ({e})") from None
    ids = [eos] if isinstance(eos, int) else eos or []
    if not all(isinstance(i, int) for i in ids):
        raise CheckpointError(f"{path}: eos_token_id {eos!r} is not a token id or a list of them")
    return tuple(ids)


def read_config(model_dir: str | Path, **runtime):
    """(the `transformers` config, ModelConfig) of an HF model dir; every refusal names its config.json."""
    hf = load_hf_config(model_dir)
    bnb.quantization(model_dir)
    runtime.setdefault("generation_eos_token_id", generation_eos(model_dir))
    try:
        return hf, from_hf_config(hf, **runtime)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{Path(model_dir) / 'config.json'}: {e}") from None


def load_config(model_dir: str | Path, **runtime) -> ModelConfig:
    return read_config(model_dir, **runtime)[1]


def _model_path(path: tuple, cfg: ModelConfig) -> tuple[tuple, int | None]:
    """A per-layer NNX path → (the model's path, the index in its stack when that leaf stacks layers)."""
    if cfg.scan_layers and len(path) > 1 and isinstance(path[1], int):
        name, j = cfg.stack_slot(path[1])
        return (name, *path[2:]), j
    return path, None


def load_pretrained(path: str | Path, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype=None, allow_pickle: bool = False, rules: dict | None = None,
                    prepare: Callable[[Transformer], Transformer] | None = None, **runtime) -> Transformer:
    """Build the model abstractly, then fill each parameter from the checkpoint in `param_dtype` (default
    `dtype`), placed with the mesh's sharding rules. `runtime` sets ModelConfig options (scan_layers, remat…).
    `prepare` reshapes the abstract model first: a weight it quantizes (`lora.quantize.quantize_base`) is
    quantized as its tensor is read, one layer at a time, so the float base is never whole in memory."""
    model_dir = Path(path)
    cfg = load_config(model_dir, **runtime)
    param_dtype = param_dtype or dtype
    headers = weight_headers(model_dir, family(cfg.model_type), allow_pickle)  # all checked before any bytes
    states = _bnb_states(model_dir, headers)

    def build():
        model = Transformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if states:
            bnb.prepare(model, states, family(cfg.model_type).tensors, cfg, lambda p: _model_path(p, cfg))
        return model if prepare is None else prepare(model)

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    filled = _fill(model_dir, cfg, flat, list(headers), lambda var: (
        variable_sharding(var, mesh, rules) if mesh is not None else None), states)
    for p, var in flat.items():
        var.set_value(filled[p]) if hasattr(var, "set_value") else setattr(var, "value", filled[p])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_shape(source, path: tuple, shape, want) -> None:
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{source}: {'/'.join(map(str, path))} has shape {tuple(shape)}, the model config "
                              f"expects {tuple(want)}")


def _bnb_states(model_dir: Path, headers: dict[Path, dict | None]) -> dict[str, bnb.State]:
    """The bitsandbytes quant state of every weight stored 4-bit (none for a float checkpoint); quantized tensors
    in a checkpoint whose config.json declares no quantization are refused."""
    if bnb.quantization(model_dir) is not None:
        return bnb.read_states(list(headers))
    quantized = bnb.quantized_names(name for header in headers.values() for name in header or {})
    if quantized:
        raise CheckpointError(f"{model_dir}: tensor {min(quantized)!r} is bitsandbytes-quantized but "
                              "config.json has no quantization_config; restore the config saved with it")
    return {}


def _fill(model_dir: Path, cfg: ModelConfig, flat: dict, files: list[Path], sharding_of,
          states: dict | None = None) -> dict[tuple, jax.Array]:
    """Every parameter of `flat` from the checkpoint, through the family's tensor table (transforms run on the
    host, per rule as soon as its tensors are read; scanned layers are stacked at the end). `states` names the
    weights stored bitsandbytes 4-bit: their codes and scales go to the quantized leaves as they are."""
    fam = family(cfg.model_type)
    table, gather = fam.tensors, Gather(fam.tensors, cfg, str(model_dir))
    collector = bnb.Collector(states or {}, str(model_dir))
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    filled: dict[tuple, jax.Array] = {}

    def place(path, arr, source):
        var = flat[path]
        _check_shape(source, path, arr.shape, var.shape)
        arr = np.asarray(arr).astype(var.dtype)
        sharding = sharding_of(var)
        filled[path] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)

    def put_parts(p, layer, parts, source):
        for part, value in parts.items():
            q = p if part == "weight" else (*p[:-1], f"{p[-1]}_{part}")
            if layer is None:
                place(q, value, source)
            else:
                stacked.setdefault(q, {})[layer] = value

    def put(pairs, source):
        for nnx_path, arr in pairs:
            p, layer = _model_path(nnx_path, cfg)
            spec = flat[p].get_metadata().get("quant") if p in flat else None
            if spec is not None:
                want = _float_shape(flat[p].shape[1:] if layer is not None else flat[p].shape, spec)
                _check_shape(source, nnx_path, arr.shape, want)
                put_parts(p, layer, _quantize(np.asarray(arr), spec), source)
            elif layer is None:
                place(p, arr, source)
            else:
                _check_shape(source, nnx_path, arr.shape, flat[p].shape[1:])
                stacked.setdefault(p, {})[layer] = np.asarray(arr)

    for file, name, arr in _iter_tensors(files):
        if collector.claims(name):
            done = collector.add(file, name, arr)
            if done is not None:
                hit = table.match_hf(done[0])
                if hit is None:
                    raise CheckpointError(f"{file}: tensor {done[0]!r} has no place in a {cfg.model_type} model")
                p, layer = _model_path(table.nnx_path(hit.rule, hit.slot, hit.layer), cfg)
                put_parts(p, layer, done[1], f"{file}: tensor {done[0]!r}")
            continue
        _refuse_integer(fam, file, name, arr.dtype)
        hit = table.match_hf(name)
        paths = [] if hit is None else table.nnx_paths(hit.rule, hit.layer)
        targets = [_model_path(p, cfg)[0] for p in paths]
        if hit is None or not all(t in flat for t in targets):
            tied_head = targets and cfg.tie_word_embeddings and all(t[0] == "lm_head" for t in targets)
            if fam.ignores(name) or tied_head:
                continue
            raise CheckpointError(f"{file}: tensor {name!r} has no place in a {cfg.model_type} model with this "
                                  "config (unsupported architecture variant or mismatched config.json)")
        put(gather.add(hit, arr), f"{file}: tensor {name!r}")
    put(gather.finish(), model_dir)
    collector.finish()
    for p, per_layer in stacked.items():
        layers = cfg.layer_stacks[p[0]]
        if sorted(per_layer) != list(range(len(layers))):
            found = sorted(layers[j] for j in per_layer)
            raise CheckpointError(f"{model_dir}: {'/'.join(map(str, p[1:]))} found for layers {found}, "
                                  f"expected {list(layers)}")
        place(p, np.stack([per_layer[j] for j in range(len(layers))]), model_dir)
    missing = [p for p in flat if p not in filled]
    if missing:
        names = ", ".join("/".join(map(str, p)) for p in missing[:5])
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the config needs: {names}")
    return filled


def _float_shape(shape, spec) -> tuple:
    """The checkpoint's shape of a weight stored quantized with `spec` (NF4 packs two codes a byte)."""
    return (*shape[:-1], shape[-1] * 2) if spec.kind == "nf4" else tuple(shape)


def _quantize(arr: np.ndarray, spec) -> dict[str, np.ndarray]:
    """One checkpoint tensor quantized on the default device, its parts brought back to the host."""
    return {k: np.asarray(v) for k, v in quantize_weight(jnp.asarray(arr), spec).items()}


def kept_tensors(model_dir: str | Path, fam: Family) -> list[Tensor]:
    """The checkpoint's tensors outside the language model (`Family.kept`: a vision tower), each read from its
    file only when written, for a merged export to carry through unchanged."""
    out = []
    for file, header in weight_headers(Path(model_dir), fam).items():
        for name, (dtype, shape) in (header or {}).items():
            if fam.keeps(name):
                out.append(Tensor(name, shape, dtype, lambda f=file, n=name: next(
                    a for k, a in read_safetensors(f) if k == n)))
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
