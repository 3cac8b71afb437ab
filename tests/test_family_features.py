"""Each new family's features, switched off one at a time, must break logit parity with transformers; and the
norm styles that only differ below fp32 are checked bit for bit against transformers' own modules in bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import torch_logits

from jaxtune import load_pretrained
from jaxtune.model.layers import RMSNorm
from jaxtune.model.transformer import Transformer

ATOL = 1e-4


def _ids(vocab: int, t: int = 24) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(0), (2, t), 0, vocab), np.int32)


def _diff(model, hf, ids) -> float:
    return float(np.abs(np.asarray(model(jnp.asarray(ids))) - torch_logits(hf, ids)).max())


def _switched(model, **change):
    """The same weights under a changed config; parameters the new structure lacks keep their fresh init."""
    other = Transformer(model.config.replace(**change), rngs=nnx.Rngs(0))
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    theirs = nnx.state(other, nnx.Param)
    for path, var in nnx.to_flat_state(theirs):
        if path in ours and ours[path].shape == var.shape:
            var.set_value(ours[path][...])
    nnx.update(other, theirs)
    return other


OFF = [
    ("gemma", dict(hidden_act="silu")),
    ("gemma", dict(embedding_multiplier=1.0)),
    ("gemma", dict(norm_style="llama")),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma2", dict(attention_scale=None)),
    ("gemma2", dict(norm_layout="pre")),
    ("gemma2", dict(sliding_layers=(False, False, False))),
    ("gemma3", dict(qk_norm="none")),
    ("gemma3", dict(sliding_rope_theta=None)),
    ("gemma3", dict(rope_type="default")),
    ("phi3", dict(partial_rotary_factor=1.0)),
    ("phi4_longrope", dict(rope_long_factor=tuple(1.0 for _ in range(6)))),
    ("phi4_longrope", dict(rope_attention_factor=1.0)),
    ("olmo2", dict(qk_norm="none")),
    ("olmo2", dict(norm_layout="sandwich")),
    ("granite", dict(embedding_multiplier=1.0)),
    ("granite", dict(residual_multiplier=1.0)),
    ("granite", dict(attention_scale=None)),
    ("granite", dict(logits_divisor=1.0)),
]


@pytest.mark.parametrize("name,change", OFF, ids=[f"{n}-{next(iter(c))}" for n, c in OFF])
def test_each_feature_switched_off_breaks_parity(hf_zoo, name, change):
    path, hf = hf_zoo(name)
    model = load_pretrained(path)
    ids = _ids(model.config.vocab_size)
    assert _diff(model, hf, ids) <= ATOL
    assert _diff(_switched(model, **change), hf, ids) > 1e-3


def test_longrope_switches_factors_per_call_like_transformers(hf_zoo):
    """Short factors up to the original context, long ones past it: both sides of the switch match, and
    swapping the long factors for the short ones breaks only the long side."""
    path, hf = hf_zoo("phi4_longrope")
    model = load_pretrained(path)
    short, long = _ids(model.config.vocab_size, 12), _ids(model.config.vocab_size, 24)
    assert max(_diff(model, hf, short), _diff(model, hf, long)) <= ATOL
    same = _switched(model, rope_long_factor=model.config.rope_short_factor)
    assert _diff(same, hf, short) <= ATOL and _diff(same, hf, long) > 1e-3


@pytest.mark.parametrize("style,module", [("gemma", "gemma.modeling_gemma.GemmaRMSNorm"),
                                          ("fp32", "olmo2.modeling_olmo2.Olmo2RMSNorm"),
                                          ("llama", "llama.modeling_llama.LlamaRMSNorm")])
def test_norm_styles_match_transformers_bit_for_bit_in_bf16(style, module):
    import importlib

    mod, cls = module.rsplit(".", 1)
    hf_norm = getattr(importlib.import_module(f"transformers.models.{mod}"), cls)(64, eps=1e-6)
    w = np.random.default_rng(0).normal(1.0 if style != "gemma" else 0.0, 0.3, 64).astype(np.float32)
    x = np.random.default_rng(1).normal(0, 3, (4, 64)).astype(np.float32)
    with torch.no_grad():
        hf_norm.weight.copy_(torch.tensor(w).to(torch.bfloat16).float())
        hf_norm.to(torch.bfloat16)
        want = hf_norm(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    results = {}
    for ours in ("gemma", "fp32", "llama"):
        norm = RMSNorm(64, 1e-6, param_dtype=jnp.bfloat16, style=ours)
        norm.weight.set_value(jnp.asarray(w, jnp.bfloat16))
        results[ours] = np.asarray(norm(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    assert np.array_equal(results[style], want)
    assert all(not np.array_equal(results[o], want) for o in results if o != style)


def test_generation_config_stop_ids_reach_generation(hf_zoo, tmp_path):
    """Gemma lists `<end_of_turn>` only in generation_config.json: loading keeps it as a stop id."""
    import json
    import shutil

    from jaxtune.generate import stop_token_ids
    from jaxtune.hf.load import CheckpointError

    path, _ = hf_zoo("gemma")
    local = tmp_path / "gemma"
    shutil.copytree(path, local)
    eos = load_pretrained(local).config.eos_token_id
    (local / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 106]}))
    model = load_pretrained(local)
    assert model.config.generation_eos_token_id == (eos, 106)
    assert stop_token_ids(model.config) == [eos, 106]
    (local / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id 'end'"):
        load_pretrained(local)


def test_sliding_layers_cache_only_their_window(hf_zoo):
    """gemma2's layers 0 and 2 slide (window 5): their caches hold 5 slots, layer 1's the whole length; a
    scanned stack shares one shape, so there every layer keeps the whole length."""
    path, _ = hf_zoo("gemma2")
    cache = load_pretrained(path).init_cache(2, 64)
    assert cache["k"].shape == (1, 2, 64, 2, 16) and cache["window_k"].shape == (2, 2, 5, 2, 16)
    assert cache["window_slots"].shape == cache["window_segment_ids"].shape == (2, 5)
    scanned = load_pretrained(path, scan_layers=True).init_cache(2, 64)
    assert scanned["k"].shape == (3, 2, 64, 2, 16) and "window_k" not in scanned


def test_cudnn_is_refused_for_a_soft_capping_model_at_load(hf_zoo):
    path, _ = hf_zoo("gemma2")
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot soft-cap"):
        load_pretrained(path, attention_impl="cudnn")


def test_mixed_dense_and_moe_layers_scan_in_two_stacks_with_hf_aux_loss(hf_zoo):
    """qwen3_moe's layer 1 is dense: scanned, the MoE layers stack in `layers` and the dense one in
    `dense_layers`; logits, the training loss with its load-balancing term, and gradients equal the per-layer
    layout's, and the auxiliary loss equals transformers' `aux_loss`."""
    from jaxtune.train.step import loss_and_grads

    path, hf = hf_zoo("qwen3_moe")
    ids = _ids(128, 16)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((2, 15), np.int32),
             "segment_ids": np.ones((2, 15), np.int32), "positions": np.tile(np.arange(15, dtype=np.int32), (2, 1))}
    results = {}
    for scan in (False, True):
        model = load_pretrained(path, scan_layers=scan)
        model.config = model.config.replace(router_aux_loss_coef=0.5)
        assert _diff(model, hf, ids) <= ATOL
        graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
        grads, (loss, _, n_loss, _, aux) = jax.jit(loss_and_grads, static_argnums=0)(
            graphdef, params, frozen, batch, jax.random.key(0))
        results[scan] = (float(loss), float(aux), grads)
    assert load_pretrained(path, scan_layers=True).config.layer_stacks == {"layers": (0, 2), "dense_layers": (1,)}
    (loss0, aux0, g0), (loss1, aux1, g1) = results[False], results[True]
    assert abs(loss0 - loss1) < 1e-5 and abs(aux0 - aux1) < 1e-6
    with torch.no_grad():
        hf_aux = float(hf(torch.tensor(ids[:, :-1]), output_router_logits=True).aux_loss)
    assert abs(aux0 - hf_aux) < 1e-5 and hf_aux > 0
    nll = float(np.asarray(torch.nn.functional.cross_entropy(
        torch.tensor(torch_logits(hf, ids[:, :-1])).reshape(-1, 128), torch.tensor(ids[:, 1:]).long().reshape(-1))))
    assert abs(loss0 - (nll + 0.5 * aux0)) < 1e-4
    dense = g1["dense_layers"]["mlp"]["gate_proj"]["weight"][...][0]
    assert np.allclose(dense, g0["layers"][1]["mlp"]["gate_proj"]["weight"][...], atol=1e-6)


def test_config_spellings_transformers_maps():
    """Gemma 1's legacy `hidden_act="gelu"` is the tanh GeLU and Phi-3's `su` RoPE is longrope, as transformers
    maps them; Gemma 2's bidirectional attention (an encoder) is refused."""
    import transformers

    from jaxtune.hf.families import from_hf_config
    from jaxtune.model.config import UnsupportedConfigError

    assert from_hf_config(transformers.GemmaConfig(hidden_act="gelu")).hidden_act == "gelu_tanh"
    su = dict(type="su", short_factor=[1.0] * 48, long_factor=[2.0] * 48)
    assert from_hf_config(transformers.Phi3Config(rope_scaling=su, original_max_position_embeddings=4096,
                                                  max_position_embeddings=16384)).rope_type == "longrope"
    with pytest.raises(UnsupportedConfigError, match="use_bidirectional_attention"):
        from_hf_config(transformers.Gemma2Config(use_bidirectional_attention=True))
