"""Quantized frozen weights for QLoRA: int8 per output channel, and NF4 as bitsandbytes stores it, bit for bit.

A quantized matrix `[out, in]` (stacked layers or experts add leading axes) is a few leaves beside its module,
named as bitsandbytes names them in an HF checkpoint (`weight.absmax` → `weight_absmax`):
- nf4: `weight` uint8 `[out, in/2]` (two 4-bit codes a byte, high nibble first, over the flattened matrix);
  `weight_absmax` `[out, in/B]` (`[⌈out·in/B⌉]` when the block size B does not divide `in` and blocks cross
  rows): fp32 scales, or with double quantization their uint8 codes under `weight_nested_quant_map` (256
  values), scaled per 256 scales by `weight_nested_absmax` and shifted by `weight_offset`.
- int8: `weight` int8 `[out, in]` and `weight_scale` fp32 `[out]` (absmax / 127.5, qwix's numerics).

`dequantize` rebuilds the matrix inside the jitted step right before its matmul; the model runs that matmul
under `recomputed`, so the backward pass rebuilds the matrix from its codes instead of holding every layer's
dequantized copy until then.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

KINDS = ("int8", "nf4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class Quantized(nnx.Param):
    """A leaf of a quantized frozen weight: codes, scales or a codebook. A `Param` (frozen with the base), told
    apart so target matching and export skip the scales and codebooks. The codes carry `quant` (the QuantSpec)
    in their metadata, the other leaves `quant_part` (their part name)."""


def is_companion(var) -> bool:
    """Whether `var` is a quantized weight's scale or codebook (not a weight of its own)."""
    return isinstance(var, Quantized) and "quant_part" in var.get_metadata()


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized."""

    kind: str
    blocksize: int = 64
    double_quant: bool = True
    nested_blocksize: int = 256

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantize: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "nf4" and self.blocksize not in BLOCKSIZES:
            raise ValueError(f"quantize blocksize {self.blocksize}: expected one of {BLOCKSIZES}")

    def rows_layout(self, in_features: int) -> bool:
        """Whether NF4 scales are `[out, in/B]` (each block inside one row, so they shard like the weight)."""
        return in_features % self.blocksize == 0


@functools.cache
def nf4_code() -> np.ndarray:
    """The 16 NormalFloat values (QLoRA, Appendix E), taken from qwix, which holds bitsandbytes' fp32 table."""
    from qwix._src.core.numerics import get_nf4_buckets

    with jax.ensure_compile_time_eval():
        return np.asarray(get_nf4_buckets(), np.float32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on CPU: an fp32 step, each value one fused
    multiply-add (a single rounding), the second half counted back from the end."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32(end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    lo = np.float64(start32) + step * idx[:half]
    hi = np.float64(end32) - step * (steps - 1 - idx[half:])
    return np.concatenate([lo, hi]).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map`), the codebook of double-quantized scales."""
    data: list[float] = []
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (i - 6))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.asarray(sorted(data), np.float32)


# ---------------------------------------------------------------------------------------------- NF4


def _blockwise_absmax(flat: Array, blocksize: int) -> tuple[Array, Array]:
    """(absmax per block of `blocksize` consecutive values, the last block possibly short; `flat` scaled by
    it and clipped to [-1, 1]) — full blocks multiply by the reciprocal and the short one divides, as
    bitsandbytes does, so codes match it bit for bit."""
    n = flat.shape[0]
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(body), axis=1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = [jnp.clip(body * inv[:, None], -1.0, 1.0).reshape(-1)]
    if full < n:
        tail = flat[full:]
        am = jnp.max(jnp.abs(tail))
        absmax = jnp.concatenate([absmax, am[None]])
        scaled.append(jnp.clip(tail / jnp.where(am > 0, am, 1.0), -1.0, 1.0))
    return absmax, jnp.concatenate(scaled)


def _nf4_matrix(w: Array, spec: QuantSpec) -> dict[str, Array]:
    out, inp = w.shape
    flat = w.astype(jnp.float32).reshape(-1)
    absmax, scaled = _blockwise_absmax(flat, spec.blocksize)
    code = nf4_code()
    bounds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))
    q = jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    parts = {"weight": packed.reshape(out, inp // 2)}
    if spec.double_quant:
        parts.update(_double_quant(absmax, spec.nested_blocksize))
    else:
        parts["absmax"] = absmax
    if spec.rows_layout(inp):
        parts["absmax"] = parts["absmax"].reshape(out, inp // spec.blocksize)
    return parts


def _double_quant(absmax: Array, blocksize: int, offset: Array | None = None) -> dict[str, Array]:
    """bitsandbytes' `compress_statistics`: the scales minus their mean, then 8-bit dynamic codes per `blocksize`
    scales, rounded as its portable (pure torch) kernel rounds: to the bucket between midpoints of the table."""
    offset = jnp.mean(absmax) if offset is None else offset
    nested_absmax, scaled = _blockwise_absmax(absmax - offset, blocksize)
    code = dynamic_map()
    bounds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))
    return {"absmax": jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8),
            "nested_absmax": nested_absmax, "offset": offset, "nested_quant_map": jnp.asarray(code)}


def _rounded(product: Array) -> Array:
    """`product` rounded to its dtype before it is added to anything: compilers contract `a·b + c` into one
    fused multiply-add (one rounding, XLA:CPU does), where bitsandbytes rounds twice. A select between the two
    is not contracted (a NaN stays NaN)."""
    return jnp.where(product == product, product, jnp.nan)


def nf4_scales(absmax: Array, spec: QuantSpec, nested_absmax: Array | None = None, offset: Array | None = None,
               nested_quant_map: Array | None = None) -> Array:
    """One matrix's fp32 block scales, in `absmax`'s layout (`[out, in/B]` or flat): `map[code] · nested +
    offset` with double quantization, as bitsandbytes' dequantizer computes them (two fp32 roundings)."""
    if not spec.double_quant:
        return absmax.astype(jnp.float32)
    flat_index = jnp.arange(absmax.size).reshape(absmax.shape)
    nested = jnp.take(nested_absmax, flat_index // spec.nested_blocksize)
    return _rounded(jnp.take(nested_quant_map, absmax.astype(jnp.int32)) * nested) + offset


def _nf4_dequant_matrix(parts: dict[str, Array], spec: QuantSpec, dtype) -> Array:
    codes = parts["weight"]
    out, half = codes.shape
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(out, 2 * half).astype(jnp.int32)
    values = jnp.take(jnp.asarray(nf4_code()), idx)
    scales = nf4_scales(parts["absmax"], spec, parts.get("nested_absmax"), parts.get("offset"),
                        parts.get("nested_quant_map"))
    b = spec.blocksize
    if scales.ndim == 2:
        w = values.reshape(out, -1, b) * scales[..., None]
    else:
        n = values.size
        padded = jnp.pad(values.reshape(-1), (0, scales.shape[0] * b - n)).reshape(-1, b)
        w = (padded * scales[:, None]).reshape(-1)[:n]
    return w.reshape(out, 2 * half).astype(dtype)


# ---------------------------------------------------------------------------------------------- int8


def _int8_matrix(w: Array, spec: QuantSpec) -> dict[str, Array]:
    import qwix

    q = qwix.quantize(w.astype(jnp.float32), jnp.int8, channelwise_axes=(0,), scale_dtype=jnp.float32)
    return {"weight": q.qvalue, "scale": q.scale[:, 0]}


def _int8_dequant_matrix(parts: dict[str, Array], spec: QuantSpec, dtype) -> Array:
    return (parts["weight"].astype(jnp.float32) * parts["scale"][:, None]).astype(dtype)


# ---------------------------------------------------------------------------------------------- API

# The leaves of a quantized weight besides `weight`, by kind (attribute `weight_<part>` on the module).
PARTS = {"int8": ("scale",), "nf4": ("absmax", "nested_absmax", "offset", "nested_quant_map")}


def part_names(spec: QuantSpec) -> tuple[str, ...]:
    if spec.kind == "int8":
        return PARTS["int8"]
    return PARTS["nf4"] if spec.double_quant else ("absmax",)


def _over_leading(fn, x, nlead: int):
    for _ in range(nlead):
        fn = jax.vmap(fn)
    return fn(x)


@functools.partial(jax.jit, static_argnums=1)
def quantize_weight(w: Array, spec: QuantSpec) -> dict[str, Array]:
    """`{"weight": codes, <part>: …}` for `w[..., out, in]`, each matrix quantized on its own (as each HF tensor
    is); stacked matrices go one at a time so the fp32 working copy is one matrix's. Compiled once per shape
    and spec: op by op it would take seconds per weight."""
    if spec.kind == "nf4" and w.shape[-1] % 2:
        raise ValueError(f"nf4 needs an even input size to pack two codes a byte, got a {w.shape} weight")
    one = functools.partial(_nf4_matrix if spec.kind == "nf4" else _int8_matrix, spec=spec)
    if w.ndim == 2:
        return one(w)
    lead = w.shape[:-2]
    flat = jax.lax.map(one, w.reshape(-1, *w.shape[-2:]))
    return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), flat)


def dequantize(parts: dict[str, Array], spec: QuantSpec, dtype) -> Array:
    """The weight `[..., out, in]` in `dtype` from its quantized leaves."""
    one = functools.partial(_nf4_dequant_matrix if spec.kind == "nf4" else _int8_dequant_matrix, spec=spec,
                            dtype=dtype)
    return _over_leading(one, parts, parts["weight"].ndim - 2)


def recomputed(fn):
    """`fn` (a matmul against a weight dequantized inside it) keeping nothing for the backward pass, which
    recomputes the weight from its codes: kept, every layer's dequantized copy would stay alive until its
    gradient, as much memory as an unquantized base."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def quantized_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes of one quantized weight of `shape` (leading axes stack matrices)."""
    *lead, out, inp = shape
    count = math.prod(lead) if lead else 1
    if spec.kind == "int8":
        return count * (out * inp + 4 * out)
    blocks = -(-out * inp // spec.blocksize)
    per = out * inp // 2 + (blocks if spec.double_quant else 4 * blocks)
    if spec.double_quant:
        per += 4 * (-(-blocks // spec.nested_blocksize)) + 4 + 4 * 256
    return count * per


# ---------------------------------------------------------------------------------------------- modules


def part_axes(part: str, value, axes: tuple, spec: QuantSpec) -> tuple:
    """Logical axes of a quantized leaf from its weight's `(*lead, out, in)`: codes and row-layout scales
    shard like the weight; a flat scale list, the nested scales and the codebooks stay whole per matrix."""
    *lead, out_ax, in_ax = axes
    if part == "weight" or (part == "absmax" and value.ndim == len(axes)):
        return tuple(axes)
    if part == "scale":
        return (*lead, out_ax)
    if part == "offset":
        return tuple(lead)
    return (*lead, None)


def quantize_param(module: nnx.Module, name: str, spec: QuantSpec, place=None) -> None:
    """Replace `module.<name>` (a float `Param` `[..., out, in]`) by its quantized leaves, in place: the codes
    stay at `<name>`, the rest go to `<name>_<part>`, and `<name>_quant` records the spec. `place(var, value)`
    puts a new leaf where it belongs (a mesh); by default leaves stay where `quantize_weight` left them."""
    var = getattr(module, name)
    axes = var.get_metadata().get("axes") or (None,) * var.ndim
    parts = quantize_weight(var[...], spec)
    for part, value in parts.items():
        meta = {"quant": spec} if part == "weight" else {"quant_part": part}
        new = Quantized(value, axes=part_axes(part, value, axes, spec), **meta)
        if place is not None:
            new.set_value(place(new, value))
        setattr(module, name if part == "weight" else f"{name}_{part}", new)
    setattr(module, f"{name}_quant", spec)


def param_value(module: nnx.Module, name: str, dtype) -> Array:
    """`module.<name>` in `dtype`: the float parameter as is, or a quantized one dequantized here."""
    spec = getattr(module, f"{name}_quant", None)
    if spec is None:
        return getattr(module, name)[...].astype(dtype)
    return dequantize(param_parts(module, name), spec, dtype)


def logical_shape(module: nnx.Module, name: str) -> tuple[int, ...]:
    """The float shape of `module.<name>`, quantized or not (NF4 codes pack two values a byte)."""
    shape = tuple(getattr(module, name).shape)
    spec = getattr(module, f"{name}_quant", None)
    return (*shape[:-1], 2 * shape[-1]) if spec is not None and spec.kind == "nf4" else shape


def param_parts(module: nnx.Module, name: str) -> dict[str, Array]:
    """The quantized leaves of `module.<name>` as `quantize_weight` returns them."""
    spec = getattr(module, f"{name}_quant")
    return {"weight": getattr(module, name)[...],
            **{part: getattr(module, f"{name}_{part}")[...] for part in part_names(spec)}}


def unquantize_param(module: nnx.Module, name: str, value: Array) -> None:
    """Replace the quantized `module.<name>` by a float `Param` holding `value` (e.g. the merged weight)."""
    spec = getattr(module, f"{name}_quant")
    axes = getattr(module, name).get_metadata().get("axes")
    for part in part_names(spec):
        delattr(module, f"{name}_{part}")
    setattr(module, name, nnx.Param(value, axes=axes))
    setattr(module, f"{name}_quant", None)
