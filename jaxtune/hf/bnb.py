"""bitsandbytes 4-bit (NF4) HF checkpoints loaded as stored: their codes and scales become the quantized leaves
of `model.quant` bit for bit, never dequantized and requantized.

On disk each quantized Linear `X` holds `X.weight` (uint8 `[out·in/2, 1]`), `X.weight.absmax`, `X.weight.quant_map`
(the 16 NF4 values), `X.weight.quant_state.bitsandbytes__nf4` (JSON: blocksize, shape, nested offset) and, with
double quantization, `X.weight.nested_absmax` and `X.weight.nested_quant_map`. Other tensors stay float.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from jaxtune.hf.safetensors import CheckpointError, read_safetensors
from jaxtune.hf.tensors import RENAME, Table
from jaxtune.model.config import UnsupportedConfigError
from jaxtune.model.quant import QuantSpec, nf4_code, quantize_param

STATE = "quant_state.bitsandbytes__"
STORED_PARTS = ("absmax", "nested_absmax", "nested_quant_map", "quant_map")
_DO = ("jaxtune loads bitsandbytes 4-bit nf4 checkpoints with uint8 storage, or float ones: "
       "dequantize this checkpoint to float (e.g. `model.dequantize()` in transformers, then save_pretrained)")


def quantization(model_dir: str | Path) -> dict | None:
    """The checkpoint's `quantization_config` when it is one jaxtune loads exactly (bitsandbytes 4-bit nf4),
    None when there is none; anything else is refused naming config.json."""
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text())
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None:
        return None
    method = qc.get("quant_method")
    problem = (f"quant_method {method!r} is not bitsandbytes" if method != "bitsandbytes"
               else "load_in_8bit is set (LLM.int8)" if qc.get("load_in_8bit") or qc.get("_load_in_8bit")
               else "load_in_4bit is not set" if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
               else f"bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r}, not 'nf4'"
               if qc.get("bnb_4bit_quant_type", "fp4") != "nf4"
               else f"bnb_4bit_quant_storage is {qc.get('bnb_4bit_quant_storage')!r}, not 'uint8'"
               if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8" else None)
    if problem:
        raise UnsupportedConfigError(f"{path}: quantization_config {problem}; {_DO}")
    return qc


def companion(name: str) -> tuple[str, str] | None:
    """(`X.weight`, part) when `name` is a bitsandbytes companion tensor `X.weight.<part>`, else None."""
    head, sep, tail = name.rpartition(".weight.") if ".weight." in name else ("", "", "")
    if sep and (tail in STORED_PARTS or tail.startswith(STATE)):
        return f"{head}.weight", tail
    return None


def quantized_names(names) -> set[str]:
    """The bitsandbytes weights (those with a quant state) and their companions among `names`."""
    names = set(names)
    weights = {c[0] for n in names if (c := companion(n)) and c[1].startswith(STATE)}
    return {n for n in names if n in weights or ((c := companion(n)) is not None and c[0] in weights)}


@dataclasses.dataclass(frozen=True)
class State:
    """One quantized weight's `quant_state`: its spec, float shape `[out, in]` and the scales' mean offset."""

    spec: QuantSpec
    shape: tuple[int, int]
    offset: float | None


def read_states(files: list[Path]) -> dict[str, State]:
    """`{X.weight: State}` for every quantized weight, read from the small quant-state tensors only."""
    out = {}
    for f in files:
        if f.suffix != ".safetensors":
            raise CheckpointError(f"{f}: a bitsandbytes 4-bit checkpoint must be safetensors to load its quant "
                                  "states; re-save it with safe_serialization=True")
        for name, arr in read_safetensors(f):
            c = companion(name)
            if c is not None and c[1].startswith(STATE):
                out[c[0]] = _state(f, name, arr)
    return out


def _state(file: Path, name: str, arr) -> State:
    where = f"{file}: tensor {name!r}"
    try:
        s = json.loads(bytes(np.asarray(arr)).decode())
        if s.get("quant_type") != "nf4":
            raise CheckpointError(f"{where} has quant_type {s.get('quant_type')!r}; {_DO}")
        double = "nested_blocksize" in s
        spec = QuantSpec("nf4", int(s["blocksize"]), double_quant=double,
                         nested_blocksize=int(s.get("nested_blocksize", 256)))
        out, inp = (int(d) for d in s["shape"])
        return State(spec, (out, inp), float(s["nested_offset"]) if double else None)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where} is not a valid bitsandbytes nf4 quant state ({e})") from None


def _module_at(model, path: tuple):
    for k in path:
        model = model[k] if isinstance(k, int) else getattr(model, k)
    return model


def prepare(model, states: dict[str, State], table: Table, cfg, model_path: Callable[[tuple], tuple]):
    """Store every weight the checkpoint holds quantized as `quant` leaves of its spec, in place (abstractly
    under `nnx.eval_shape`); returns `model`. A stack of scanned layers needs one spec for all its layers."""
    sites: dict[tuple, dict] = {}
    for name, state in states.items():
        hit = table.match_hf(name)
        if hit is None:
            continue
        r = table.rules[hit.rule]
        if r.transform is not RENAME:
            raise CheckpointError(f"tensor {name!r} is bitsandbytes-quantized, but jaxtune maps it with a "
                                  f"{r.transform.name} transform that only float tensors take; {_DO}")
        p, layer = model_path(table.nnx_path(hit.rule, hit.slot, hit.layer))
        sites.setdefault(p, {})[layer] = state.spec
    for p, per_layer in sites.items():
        specs = set(per_layer.values())
        stacked = None not in per_layer
        where = "/".join(map(str, p))
        if stacked and (len(specs) > 1 or len(per_layer) != len(cfg.layer_stacks[p[0]])):
            raise CheckpointError(f"{where}: the checkpoint quantizes its layers differently (or only some of "
                                  "them), which a scanned stack cannot hold; load with scan_layers=False")
        module = _module_at(model, p[:-1])
        if not isinstance(getattr(module, p[-1], None), nnx.Variable):
            raise CheckpointError(f"{where}: the checkpoint holds it bitsandbytes-quantized, but it is no "
                                  "parameter of this model")
        quantize_param(module, p[-1], specs.pop())
    return model


class Collector:
    """Gathers one quantized weight's tensors (they may arrive in any order) into the leaves `quantize_weight`
    would give: codes `[out, in/2]`, absmax `[out, in/B]` (flat when blocks cross rows), nested scales,
    offset and codebook."""

    def __init__(self, states: dict[str, State], source: str):
        self.states, self.source = states, source
        self._pending: dict[str, dict] = {}

    def claims(self, name: str) -> bool:
        c = companion(name)
        return name in self.states or (c is not None and c[0] in self.states)

    def add(self, file: Path, name: str, arr) -> tuple[str, dict] | None:
        """Take one tensor; returns (`X.weight`, its leaves) once that weight's tensors are all read."""
        weight, part = (name, "weight") if name in self.states else companion(name)
        if part.startswith(STATE):
            return None
        got = self._pending.setdefault(weight, {})
        got[part] = (file, np.asarray(arr))
        if not self._needs(weight) <= got.keys():
            return None
        return weight, self._leaves(weight, self._pending.pop(weight))

    def finish(self) -> None:
        for weight, got in self._pending.items():
            missing = sorted(self._needs(weight) - got.keys())
            raise CheckpointError(f"{self.source}: bitsandbytes weight {weight!r} lacks {missing}")

    def _needs(self, weight: str) -> set:
        double = self.states[weight].spec.double_quant
        return {"weight", "absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if double else set())

    def _leaves(self, weight: str, got: dict) -> dict[str, np.ndarray]:
        state = self.states[weight]
        spec, (out, inp) = state.spec, state.shape

        def take(part, dtype, size):
            file, a = got[part]
            if a.dtype != dtype or a.size != size:
                raise CheckpointError(f"{file}: tensor {weight}.{part} is {a.dtype}{list(a.shape)}, its quant "
                                      f"state ({out}x{inp}, blocksize {spec.blocksize}) needs {size} {dtype}")
            return a.reshape(-1)

        if not np.array_equal(take("quant_map", np.float32, 16), nf4_code()):
            raise CheckpointError(f"{got['quant_map'][0]}: tensor {weight}.quant_map is not the NF4 codebook; {_DO}")
        blocks = math.ceil(out * inp / spec.blocksize)
        absmax = take("absmax", np.uint8 if spec.double_quant else np.float32, blocks)
        leaves = {"weight": take("weight", np.uint8, out * inp // 2).reshape(out, inp // 2),
                  "absmax": absmax.reshape(out, inp // spec.blocksize) if spec.rows_layout(inp) else absmax}
        if spec.double_quant:
            nested = math.ceil(blocks / spec.nested_blocksize)
            leaves.update(nested_absmax=take("nested_absmax", np.float32, nested),
                          offset=np.float32(state.offset),
                          nested_quant_map=take("nested_quant_map", np.float32, 256))
        return leaves
