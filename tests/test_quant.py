"""Quantized frozen weights against bitsandbytes (NF4, bit for bit) and qwix (int8), on CPU.

bitsandbytes has two CPU kernels for the 8-bit codes of double-quantized scales: the native C one that
`quantize_4bit` calls, whose binary search sometimes lands on a neighbour of the nearest entry, and a portable
pure-torch one that rounds to the nearest entry. Ours is the portable one's bit for bit; against the native one
we ask for near agreement and never a farther code. bitsandbytes' CPU `dequantize_4bit` is wrong when 64-blocks
cross rows (e.g. `in` = 96), so those shapes are checked against a numpy decode of the flat format.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bnb_models import offline_bnb

from jaxtune.model.quant import (
    QuantSpec,
    _double_quant,
    dequantize,
    dynamic_map,
    nf4_code,
    quantize_weight,
    quantized_nbytes,
)

NF4 = QuantSpec("nf4", double_quant=False)
NF4_DQ = QuantSpec("nf4")
INT8 = QuantSpec("int8")
SPECS = {"nf4": NF4, "nf4_dq": NF4_DQ, "int8": INT8}
JNP_DTYPES = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}
ACROSS_ROWS = (333, 96)  # bitsandbytes' CPU dequantize_4bit is wrong for it


@pytest.fixture(scope="module")
def bnb():
    with offline_bnb():
        from bitsandbytes import functional
    return functional


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _portable_quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' pure-torch blockwise 8-bit kernel, bypassing the native CPU one registered over it."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


def _parts_from_bnb(packed: torch.Tensor, state, shape) -> dict:
    """A bitsandbytes 4-bit weight and quant state as `quantize_weight` lays the parts out."""
    out, inp = shape
    parts = {"weight": jnp.asarray(packed.numpy().reshape(out, inp // 2)), "absmax": jnp.asarray(state.absmax.numpy())}
    if state.nested:
        parts.update(nested_absmax=jnp.asarray(state.state2.absmax.numpy()), offset=jnp.float32(state.offset.item()),
                     nested_quant_map=jnp.asarray(state.state2.code.numpy()))
    if inp % 64 == 0:
        parts["absmax"] = parts["absmax"].reshape(out, inp // 64)
    return parts


def _numpy_decode(parts: dict, shape, blocksize: int = 64, nested_blocksize: int = 256) -> np.ndarray:
    """The flat NF4 format decoded in numpy: `nf4[nibble] · scale[i // blocksize]` over the flattened matrix,
    the scale `map[code] · nested[j // nested_blocksize] + offset` (two fp32 roundings) when double-quantized."""
    packed = np.asarray(parts["weight"]).reshape(-1)
    nibbles = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
    scales = np.asarray(parts["absmax"]).reshape(-1)
    if "nested_absmax" in parts:
        nested = np.asarray(parts["nested_absmax"])[np.arange(scales.size) // nested_blocksize]
        scales = np.asarray(parts["nested_quant_map"])[scales] * nested + np.asarray(parts["offset"])
    return (nf4_code()[nibbles] * scales[np.arange(nibbles.size) // blocksize]).reshape(shape)


# Jitted as the loader quantizes (hf/load.py) and the train step dequantizes: XLA's fusion is what must match.
_quantize = jax.jit(quantize_weight, static_argnums=1)
_dequantize = jax.jit(dequantize, static_argnums=(1, 2))


def max_abs_error(w, spec: QuantSpec):
    """The format's bound on `|w - dequantize(quantize(w))|` per element (broadcast to `w`'s shape): half the
    widest gap between neighbouring codes times the block's scale (NF4), or half a step (int8); the double-
    quantized scale's own error is added for NF4."""
    wf = w.astype(jnp.float32)
    if spec.kind == "int8":
        return jnp.max(jnp.abs(wf), axis=-1, keepdims=True) / 127.0 / 2.0 * jnp.ones_like(wf)
    gap = float(np.max(np.diff(nf4_code()))) / 2.0
    n = math.prod(w.shape[-2:])
    flat = wf.reshape(*w.shape[:-2], n)
    pad = -n % spec.blocksize
    blocks = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)]).reshape(*flat.shape[:-1], -1, spec.blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scale_err = 0.0
    if spec.double_quant:
        codes = dynamic_map()
        step = float(np.max(np.diff(codes))) / 2.0
        scale_err = step * jnp.max(jnp.abs(absmax - jnp.mean(absmax, axis=(-2, -1), keepdims=True)))
    bound = (gap * (absmax + scale_err) + scale_err) * jnp.ones_like(blocks)
    return bound.reshape(*flat.shape[:-1], -1)[..., :n].reshape(w.shape)


_max_abs_error = jax.jit(max_abs_error, static_argnums=1)


def _dequant_f32(parts: dict, spec: QuantSpec) -> np.ndarray:
    return np.asarray(_dequantize(parts, spec, jnp.float32))


def test_codebooks_are_bitsandbytes(bnb):
    assert np.array_equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(dynamic_map(), bnb.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("shape,dtype", [((17, 172), torch.float32), ((64, 128), torch.float32),
                                         ((300, 512), torch.float32), ((17, 172), torch.bfloat16)])
def test_nf4_codes_and_absmax_match_bitsandbytes(bnb, shape, dtype):
    w = _randn(shape, seed=shape[0], scale=0.05).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = _quantize(jnp.asarray(w.float().numpy()).astype(JNP_DTYPES[dtype]), NF4)
    assert set(ours) == {"weight", "absmax"}
    assert ours["weight"].dtype == jnp.uint8 and ours["weight"].shape == (shape[0], shape[1] // 2)
    np.testing.assert_array_equal(np.asarray(ours["weight"]), packed.numpy().reshape(shape[0], -1))
    blocks_in_rows = shape[1] % 64 == 0
    assert ours["absmax"].shape == ((shape[0], shape[1] // 64) if blocks_in_rows else (state.absmax.numel(),))
    np.testing.assert_array_equal(np.asarray(ours["absmax"]).reshape(-1), state.absmax.numpy())


@pytest.mark.parametrize("shape", [(17, 172), (300, 512)])
def test_double_quant_matches_bitsandbytes(bnb, shape):
    w = _randn(shape, seed=shape[1], scale=0.02)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, plain = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = _quantize(jnp.asarray(w.numpy()), NF4_DQ)
    assert ours["absmax"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(ours["weight"]).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours["nested_quant_map"]), state.state2.code.numpy())
    # The mean of the scales: torch's fp32 sum may round differently (its vector width), by at most an ulp.
    bnb_offset = np.float32(state.offset.item())
    assert abs(np.float32(ours["offset"]) - bnb_offset) <= np.spacing(bnb_offset)

    # Bit for bit with the portable kernel, given the same offset (our own, and bitsandbytes').
    code = state.state2.code
    want_codes, want_nested = _portable_quantize_blockwise(plain.absmax - torch.tensor(np.float32(ours["offset"])),
                                                           code, 256)
    np.testing.assert_array_equal(np.asarray(ours["absmax"]).reshape(-1), want_codes.numpy())
    np.testing.assert_array_equal(np.asarray(ours["nested_absmax"]), want_nested.numpy())
    given = jax.jit(_double_quant, static_argnums=1)(jnp.asarray(plain.absmax.numpy()), 256, jnp.float32(bnb_offset))
    want_codes, want_nested = _portable_quantize_blockwise(plain.absmax - state.offset, code, 256)
    np.testing.assert_array_equal(np.asarray(given["absmax"]), want_codes.numpy())
    np.testing.assert_array_equal(np.asarray(given["nested_absmax"]), want_nested.numpy())

    # The native kernel: the same nested scales, nearly the same codes, and ours never the farther one.
    np.testing.assert_array_equal(np.asarray(given["nested_absmax"]), state.state2.absmax.numpy())
    ours_codes, native_codes = np.asarray(given["absmax"]).astype(np.int64), state.absmax.numpy().astype(np.int64)
    assert (ours_codes == native_codes).mean() >= 0.99
    centred = plain.absmax - state.offset
    nested = torch.repeat_interleave(state.state2.absmax, 256)[:centred.numel()]
    full = centred.numel() - centred.numel() % 256  # normalised as the kernels do: reciprocal, the tail divides
    normed = torch.cat([centred[:full] * (1.0 / nested[:full]), centred[full:] / nested[full:]]).numpy()
    normed = normed.astype(np.float64)
    table = code.numpy().astype(np.float64)
    assert np.all(np.abs(normed - table[ours_codes]) <= np.abs(normed - table[native_codes]))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(64, 128), (300, 512), (17, 172)])
def test_dequantize_matches_bitsandbytes_bit_for_bit(bnb, shape, double_quant):
    """Under jit, where XLA:CPU would fuse the scale's multiply-add that bitsandbytes rounds twice."""
    w = _randn(shape, seed=7, scale=0.1)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    spec = NF4_DQ if double_quant else NF4
    np.testing.assert_array_equal(_dequant_f32(_parts_from_bnb(packed, state, shape), spec),
                                  bnb.dequantize_4bit(packed, state).numpy())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_blocks_across_rows(double_quant):
    """333·96 values: 499½ blocks of 64 (a short last one) in two blocks of 256 scales."""
    spec, shape = (NF4_DQ if double_quant else NF4), ACROSS_ROWS
    w = jnp.asarray(_randn(shape, seed=3).numpy())
    parts = _quantize(w, spec)
    assert parts["absmax"].shape == (500,)
    deq = _dequant_f32(parts, spec)
    np.testing.assert_array_equal(deq, _numpy_decode(parts, shape))
    assert np.all(np.abs(deq - np.asarray(w)) <= np.asarray(_max_abs_error(w, spec)))


def _heavy_tailed(shape, seed: int) -> jnp.ndarray:
    """Student-t weights: a few large values per row and block, as real checkpoints have."""
    return jnp.asarray(np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32) * 0.02)


@pytest.mark.parametrize("name", SPECS)
def test_round_trip_error_within_format_bound(name):
    spec, shape = SPECS[name], ACROSS_ROWS
    w = _heavy_tailed(shape, seed=4)
    err = np.abs(_dequant_f32(_quantize(w, spec), spec) - np.asarray(w))
    bound = np.asarray(_max_abs_error(w, spec))
    assert bound.shape == shape
    assert np.all(err <= bound)
    assert (err / bound).max() > 0.5


def test_int8_is_per_output_channel():
    w = _heavy_tailed(ACROSS_ROWS, seed=5).at[3].set(0.0)
    parts = _quantize(w, INT8)
    assert set(parts) == {"weight", "scale"}
    assert parts["weight"].dtype == jnp.int8 and parts["weight"].shape == ACROSS_ROWS
    assert parts["scale"].dtype == jnp.float32 and parts["scale"].shape == (ACROSS_ROWS[0],)
    absmax = np.max(np.abs(np.asarray(w)), axis=1)
    # qwix's symmetric int8 range is ±127.5 (the end buckets are whole), and an all-zero row gets scale 1.
    want = np.where(absmax > 0, absmax / np.float32(127.5), np.float32(1.0))
    assert np.all(np.abs(np.asarray(parts["scale"]) - want) <= np.spacing(want))
    scale = np.asarray(parts["scale"])[:, None]
    err = np.abs(_dequant_f32(parts, INT8) - np.asarray(w))
    # A value on a bucket's edge may round either way: w / scale is one fp32 rounding off.
    assert np.all(err <= scale / 2 + np.spacing(absmax)[:, None])
    assert np.all(np.abs(np.asarray(parts["weight"]).astype(np.int32)).max(axis=1)[absmax > 0] >= 127)


STACKS = [("nf4", (3,), (17, 172)), ("nf4", (2, 2), (64, 128)), ("nf4_dq", (3,), (17, 172)),
          ("nf4_dq", (2, 2), (17, 172)), ("int8", (3,), ACROSS_ROWS), ("int8", (2, 2), ACROSS_ROWS)]


@pytest.mark.parametrize("name,lead,matrix", STACKS, ids=[f"{n}-{'x'.join(map(str, lead))}" for n, lead, _ in STACKS])
def test_stacked_matrices_quantize_one_by_one(name, lead, matrix):
    """Each matrix its own blocks (17·172 is not a multiple of 64), double-quant offset and nested scales."""
    spec = SPECS[name]
    scales = np.array([1.0, 0.01, 30.0, 0.2])[:np.prod(lead)].reshape(*lead, 1, 1)
    w = jnp.asarray((np.random.default_rng(1).standard_normal((*lead, *matrix)) * scales).astype(np.float32))
    stacked = _quantize(w, spec)
    deq = _dequant_f32(stacked, spec)
    for idx in np.ndindex(*lead):
        one = _quantize(w[idx], spec)
        assert set(one) == set(stacked)
        for key, value in one.items():
            np.testing.assert_array_equal(np.asarray(stacked[key][idx]), np.asarray(value), err_msg=key)
        np.testing.assert_array_equal(deq[idx], _dequant_f32(one, spec))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shape", [(64, 128), (17, 172), (600, 96), (2, 3, 24, 96)])
def test_quantized_nbytes_matches_parts(name, shape):
    spec = SPECS[name]
    parts = jax.eval_shape(lambda w: quantize_weight(w, spec), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    assert quantized_nbytes(shape, spec) == sum(a.size * a.dtype.itemsize for a in parts.values())


def test_bad_specs_fail_clearly():
    with pytest.raises(ValueError, match="not one of int8, nf4"):
        QuantSpec("int4")
    with pytest.raises(ValueError, match="blocksize 100: expected one of"):
        QuantSpec("nf4", blocksize=100)
    with pytest.raises(ValueError, match="even input size"):
        quantize_weight(jnp.ones((4, 7)), NF4)
