"""The safetensors format, both directions, with one dtype-code table.

Reading validates each file with the `safetensors` library, then memory-maps it (nothing is copied until a
tensor is used); writing streams lazily computed tensors, header first from their shapes, so neither side
holds a second copy of a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

# safetensors dtype code → numpy dtype (bf16 via ml_dtypes); the writer uses the inverse.
DTYPE_CODES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


class CheckpointError(ValueError):
    """A weight file or model directory we cannot load, with the file and tensor named."""


class Tensor:
    """An output tensor known by name, shape and dtype before its bytes are computed."""

    __slots__ = ("name", "shape", "dtype", "_make")

    def __init__(self, name: str, shape: tuple, dtype, make: Callable[[], jax.Array]):
        self.name, self.shape, self.dtype, self._make = name, tuple(shape), np.dtype(dtype), make

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def then(self, fn: Callable) -> Tensor:
        """The same tensor with `fn` applied to its computed value (e.g. gathered onto the host)."""
        return Tensor(self.name, self.shape, self.dtype, lambda: fn(self._make()))

    def numpy(self) -> np.ndarray:
        arr = np.asarray(jax.device_get(self._make()))
        assert arr.shape == self.shape and arr.dtype == self.dtype, (self.name, arr.shape, arr.dtype)
        return arr


def _parse(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the tensor bytes begin, the header's tensor entries), after the `safetensors` library has
    validated the whole layout: header size and JSON, dtypes, and offsets covering the file exactly."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in DTYPE_CODES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return 8 + n, header


def read_header(path: Path) -> dict[str, tuple[np.dtype, tuple]]:
    """Each tensor's (dtype, shape) from one validated file, without reading any tensor bytes."""
    return {name: (dtype_of(info), tuple(info["shape"])) for name, info in _parse(path)[1].items()}


def dtype_of(info: dict) -> np.dtype:
    return np.dtype(DTYPE_CODES[info["dtype"]])


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` from one validated safetensors file as zero-copy views of a read-only memmap.

    Not `safe_open(...).get_tensor`: it copies each tensor into fresh memory, and a loader stacking scanned
    layers holds every layer's tensors until the end, so copies would cost host memory the size of the model."""
    base, header = _parse(path)
    if not header:
        return
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        start, end = info["data_offsets"]
        yield name, mm[base + start: base + end].view(dtype_of(info)).reshape(info["shape"])


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict | None = None) -> None:
    """Stream `tensors` into one safetensors file (header first from shapes, then bytes tensor by tensor)."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for t in tensors:
        if t.dtype not in _CODE_OF:
            raise ValueError(f"{path}: tensor {t.name} has dtype {t.dtype} that safetensors export does not support")
        header[t.name] = {"dtype": _CODE_OF[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            f.write(np.ascontiguousarray(t.numpy()).tobytes())
