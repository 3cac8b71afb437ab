"""The safetensors format, both directions, with one dtype-code table.

Reading memory-maps the file (nothing is copied until a tensor is used); writing streams lazily computed
tensors, header first from their shapes, so neither side holds a second copy of a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

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

    def numpy(self) -> np.ndarray:
        arr = np.asarray(jax.device_get(self._make()))
        assert arr.shape == self.shape and arr.dtype == self.dtype, (self.name, arr.shape, arr.dtype)
        return arr


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` from one safetensors file via a read-only memmap."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPE_CODES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        yield name, mm[base + start: base + end].view(DTYPE_CODES[info["dtype"]]).reshape(info["shape"])


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
