"""The family table: tensor transforms both ways (synthetic tables, then the real loader and exporter on a
re-laid-out checkpoint), config round trips HF → ModelConfig → HF per zoo model, refusals, parameter counts."""

from __future__ import annotations

import dataclasses
import json
import struct
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_models import BASE, VARIANTS, make_config

from jaxtune.hf.config import rope_params
from jaxtune.hf.families import FAMILIES, family, from_hf_config, nnx_to_hf
from jaxtune.hf.safetensors import CheckpointError, Tensor, read_safetensors, write_safetensors
from jaxtune.hf.tensors import (RENAME, STACK, Table, Transform, chain, fuse, renames, rule, split, to_hf, to_nnx,
                                transpose)
from jaxtune.model.config import UnsupportedConfigError

RNG = np.random.RandomState(0)
QKV = (8, 4, 4)  # q, k, v rows of the synthetic fused tensor


def _rand(*shape):
    return RNG.randn(*shape).astype(np.float32)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k]) for k in a)


def _tensors(arrays: dict) -> list[Tensor]:
    return [Tensor(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]


def _round_trips(table: Table, tensors: dict) -> bool:
    return _same(to_hf(table, to_nnx(table, tensors)), tensors)


# --- transforms on synthetic tables -------------------------------------------------------------------

def test_split_fused_tensor_round_trip():
    """Phi-3-style `qkv_proj` split into q/k/v on load, fused again on export; `gate_up` the same, by halves."""
    table = Table([
        rule("layers.{i}.attn.qkv_proj.weight", [f"layers/{{i}}/attn/{p}_proj/weight" for p in "qkv"],
             split(0, lambda cfg: QKV)),
        rule("layers.{i}.mlp.gate_up_proj.weight", ["layers/{i}/mlp/gate_proj/weight", "layers/{i}/mlp/up_proj/weight"],
             split(0, 2)),
    ])
    hf = {f"model.layers.{i}.attn.qkv_proj.weight": _rand(16, 6) for i in range(2)}
    hf |= {f"model.layers.{i}.mlp.gate_up_proj.weight": _rand(10, 6) for i in range(2)}
    nnx = to_nnx(table, hf)
    q = hf["model.layers.1.attn.qkv_proj.weight"]
    assert np.array_equal(nnx[("layers", 1, "attn", "k_proj", "weight")], q[8:12])
    gate_up = hf["model.layers.0.mlp.gate_up_proj.weight"]
    assert np.array_equal(nnx[("layers", 0, "mlp", "up_proj", "weight")], gate_up[5:])
    assert len(nnx) == 10
    assert _same(to_hf(table, nnx), hf)


def test_fuse_kept_fused_and_transpose():
    """Several HF tensors → one NNX tensor (and back); a fused tensor kept fused is a plain rename."""
    table = Table([
        rule(["layers.{i}.mlp.w1.weight", "layers.{i}.mlp.w3.weight"], "layers/{i}/mlp/w13/weight", fuse(0, 2)),
        rule("layers.{i}.attn.qkv_proj.weight"),
        rule("layers.{i}.mlp.w2.weight", transform=transpose(1, 0)),
    ])
    hf = {"model.layers.0.mlp.w1.weight": _rand(3, 4), "model.layers.0.mlp.w3.weight": _rand(3, 4),
          "model.layers.0.attn.qkv_proj.weight": _rand(9, 4), "model.layers.0.mlp.w2.weight": _rand(4, 3)}
    nnx = to_nnx(table, hf)
    assert nnx[("layers", 0, "mlp", "w13", "weight")].shape == (6, 4)
    assert ("layers", 0, "attn", "qkv_proj", "weight") in nnx
    assert np.array_equal(nnx[("layers", 0, "mlp", "w2", "weight")], hf["model.layers.0.mlp.w2.weight"].T)
    assert _same(to_hf(table, nnx), hf)


def test_stacked_experts_round_trip():
    """Per-expert tensors on disk ↔ one `[E, …]` array (here also transposed to `[E, in, out]`)."""
    table = Table([rule("layers.{i}.moe.experts.{e}.w1.weight", transform=chain(STACK, transpose(0, 2, 1))),
                   rule("layers.{i}.moe.experts.{e}.w2.weight", transform=STACK)])
    hf = {f"model.layers.{i}.moe.experts.{e}.{w}.weight": _rand(5, 3) for i in range(2) for e in range(4)
          for w in ("w1", "w2")}
    nnx = to_nnx(table, hf)
    w1 = nnx[("layers", 1, "moe", "experts", "w1", "weight")]
    assert w1.shape == (4, 3, 5) and np.array_equal(w1[2], hf["model.layers.1.moe.experts.2.w1.weight"].T)
    assert nnx[("layers", 0, "moe", "experts", "w2", "weight")].shape == (4, 5, 3)
    assert _same(to_hf(table, nnx), hf)
    del hf["model.layers.0.moe.experts.1.w2.weight"]
    with pytest.raises(CheckpointError, match=r"experts\.\{e\}\.w2\.weight found for experts \[0, 2, 3\]"):
        to_nnx(table, hf)


def test_prefixes():
    """Body names under a multimodal prefix, the head under its own; NNX paths are the names minus them."""
    rules = [rule("lm_head.weight", head=True), *renames("embed_tokens.weight", "layers.{i}.norm.weight")]
    table = Table(rules, prefix="language_model.model.", head_prefix="language_model.")
    hf = {"language_model.lm_head.weight": _rand(4, 2), "language_model.model.embed_tokens.weight": _rand(4, 2),
          "language_model.model.layers.0.norm.weight": _rand(2)}
    assert set(to_nnx(table, hf)) == {("lm_head", "weight"), ("embed_tokens", "weight"),
                                      ("layers", 0, "norm", "weight")}
    assert _round_trips(table, hf)
    assert table.match_hf("model.embed_tokens.weight") is None
    assert _round_trips(Table(rules), {"lm_head.weight": _rand(4, 2), "model.layers.3.norm.weight": _rand(2)})


def test_a_transform_that_is_not_inverted_fails_the_round_trip():
    hf = {"model.w.weight": _rand(3, 4)}
    forgot = Transform("transpose, not undone", lambda xs, cfg: [xs[0].T], RENAME.save)
    assert _round_trips(Table([rule("w.weight", transform=transpose(1, 0))]), hf)
    assert not _round_trips(Table([rule("w.weight", transform=forgot)]), hf)
    off = Transform("split, fused in the wrong order", split(0, 3).load,
                    lambda xs, cfg: split(0, 3).save(xs[::-1], cfg))
    hf = {"model.qkv.weight": _rand(6, 2)}
    assert not _round_trips(Table([rule("qkv.weight", ["q", "k", "v"], off)]), hf)


def test_bad_tables_and_incomplete_groups_are_refused():
    with pytest.raises(ValueError, match="more than one rule"):
        Table([rule("a.weight"), rule("b.weight", "a/weight")])
    with pytest.raises(ValueError, match="only on HF names"):
        Table([rule("x.{e}.weight", "x/{e}/weight", STACK)])
    with pytest.raises(ValueError, match="every name or none"):
        Table([rule("layers.{i}.w", "w")])
    wrong_count = Table([rule("qkv.weight", ["q", "k"], split(0, 3))])
    with pytest.raises(ValueError, match="gave 3 arrays for 2 names"):
        to_nnx(wrong_count, {"model.qkv.weight": _rand(6, 2)})
    fused = Table([rule(["w1.weight", "w3.weight"], "w13", fuse(0, 2))])
    with pytest.raises(CheckpointError, match=r"lacks \['model.w3.weight'\]"):
        to_nnx(fused, {"model.w1.weight": _rand(2, 2)})
    with pytest.raises(ValueError, match="not .*'w3/weight'"):
        to_hf(Table([rule(["w1.weight"], ["w1/weight", "w3/weight"], split(0, 2))]),
              {("w1", "weight"): _rand(2, 2)})


def test_nnx_to_hf_names_one_to_one_parameters_only(monkeypatch):
    assert nnx_to_hf("qwen3", ("layers", "self_attn", "k_norm", "weight"), 2) == \
        "model.layers.2.self_attn.k_norm.weight"
    assert nnx_to_hf("llama", ("lm_head", "weight")) == "lm_head.weight"
    with pytest.raises(KeyError, match="in the llama table"):
        nnx_to_hf("llama", ("layers", 0, "self_attn", "q_norm", "weight"))
    split_qkv = dataclasses.replace(FAMILIES["llama"], tensors=_relaid_table())
    monkeypatch.setitem(FAMILIES, "llama", split_qkv)
    with pytest.raises(KeyError, match="one part of the split"):
        nnx_to_hf("llama", ("layers", 0, "self_attn", "q_proj", "weight"))


def test_safetensors_dtype_table_round_trips(tmp_path):
    arrays = {code: np.abs(RNG.randn(3, 2) * 10).astype(t) for code, t in
              {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
               "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}.items()}
    write_safetensors(tmp_path / "x.safetensors", _tensors(arrays))
    raw = (tmp_path / "x.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert all(header[k]["dtype"] == k for k in arrays)
    back = dict(read_safetensors(tmp_path / "x.safetensors"))
    assert all(back[k].dtype == a.dtype and np.array_equal(back[k], a) for k, a in arrays.items())


# --- the real loader and exporter on a re-laid-out checkpoint -----------------------------------------

def _q_k_v(cfg):
    return (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim)


def _relaid_table() -> Table:
    """Llama under a multimodal prefix, q/k/v fused on disk, gate_proj stored row by row as if per expert."""
    base = [r for r in FAMILIES["llama"].tensors.rules
            if not any(p in r.hf[0] for p in ("q_proj", "k_proj", "v_proj", "gate_proj.weight"))]
    return Table([*base,
                  rule("layers.{i}.self_attn.qkv_proj.weight",
                       [f"layers/{{i}}/self_attn/{p}_proj/weight" for p in "qkv"], split(0, _q_k_v)),
                  rule("layers.{i}.mlp.gate_proj.rows.{e}", "layers/{i}/mlp/gate_proj/weight", STACK)],
                 prefix="language_model.model.", head_prefix="language_model.")


def _relay(tensors: dict) -> dict:
    out = {}
    for name, arr in tensors.items():
        if ".q_proj." in name:
            parts = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = np.concatenate(parts)
        elif "gate_proj" in name:
            out |= {f"{name.removesuffix('.weight')}.rows.{e}": row for e, row in enumerate(arr)}
        elif ".k_proj." not in name and ".v_proj." not in name:
            out[name] = arr
    return {"language_model." + n: a for n, a in out.items()}


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_loader_and_exporter_run_the_transforms(hf_zoo, tmp_path, monkeypatch, scan):
    from jaxtune import load_pretrained
    from jaxtune.hf.save import hf_tensors

    path, _ = hf_zoo("llama_gqa")
    plain = load_pretrained(path, scan_layers=scan)
    original = {n: np.asarray(a) for n, a in read_safetensors(path / "model.safetensors")}
    relaid = _relay(original)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors", _tensors(relaid))
    monkeypatch.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], tensors=_relaid_table()))

    model = load_pretrained(tmp_path, scan_layers=scan)
    ids = jnp.asarray(RNG.randint(0, 128, (2, 9)))
    assert np.array_equal(np.asarray(model(ids)), np.asarray(plain(ids)))
    exported = {t.name: t.numpy() for t in hf_tensors(model)}
    assert _same(exported, relaid)
    with pytest.raises(CheckpointError, match="has no place"):
        load_pretrained(path)


# --- config translation ---------------------------------------------------------------------------------

# HF fields a written config may legitimately spell differently from the zoo's: head_dim explicit where the
# class derives it, and Qwen2's max_window_layers superseded by the layer_types we write.
# Written in another (equivalent) place: Phi-3 reads partial_rotary_factor from the top level or rope_parameters.
_RESPELLED = {"head_dim", "max_window_layers", "partial_rotary_factor"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_round_trips(name):
    import transformers

    hf = make_config(name)
    cfg = from_hf_config(hf)
    back = transformers.AutoConfig.for_model(cfg.model_type, **family(cfg.model_type).to_hf(cfg))
    assert from_hf_config(back) == cfg
    a, b = hf.to_dict(), back.to_dict()
    if "text_config" in a:  # multimodal: the text model's config is what jaxtune writes
        a, b = a["text_config"], b["text_config"]
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= _RESPELLED
    assert b["head_dim"] == (a.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_num_params_counts_every_weight(name):
    import transformers
    from flax import nnx

    from jaxtune.model.transformer import Transformer

    cfg = from_hf_config(make_config(name))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert cfg.num_params() == sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("cls, fields, match", [
    ("LlamaConfig", dict(sliding_window=16), "sliding_window=16: the llama family"),
    ("LlamaConfig", dict(pretraining_tp=2), "pretraining_tp"),
    ("LlamaConfig", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    ("LlamaConfig", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope_type='dynamic'"),
    ("LlamaConfig", dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                                          "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
     "per layer type"),
    ("Qwen3Config", dict(layer_types=["full_attention", "chunked_attention"]), "chunked_attention"),
    ("MistralConfig", dict(attention_bias=True), "Mistral has no attention bias"),
    ("LlamaConfig", dict(hidden_act="gelu_pytorch_tanh"), "hidden_act"),
])
def test_unhonourable_fields_are_refused(cls, fields, match):
    import transformers

    hf = getattr(transformers, cls)(**{**BASE, "num_hidden_layers": 2})
    for k, v in fields.items():
        setattr(hf, k, v)
    with pytest.raises(UnsupportedConfigError, match=match):
        from_hf_config(hf)


def test_unknown_family_and_inexpressible_model():
    from jaxtune.hf.save import hf_config_from_model

    with pytest.raises(UnsupportedConfigError, match="model_type='gpt_neox'.*llama, mistral, qwen2, qwen3, gemma"):
        family("gpt_neox")
    cfg = from_hf_config(SimpleNamespace(model_type="llama", **BASE, num_key_value_heads=2, attention_bias=True))
    assert cfg.qkv_bias and cfg.o_bias
    with pytest.raises(ValueError, match="o_bias"):
        hf_config_from_model(cfg.replace(o_bias=False), "float32")


def test_rope_per_layer_type_is_expressible():
    """Gemma 3 (transformers 5) nests rope_parameters by layer type; a family part picks each one."""
    hf = SimpleNamespace(rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0),
                                          "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    assert rope_params(hf, "sliding_attention") == dict(rope_type="default", rope_theta=1e4)
    assert rope_params(hf, "full_attention")["factor"] == 8.0
    flat = SimpleNamespace(rope_parameters=None, rope_scaling=None, rope_theta=5e5)
    assert rope_params(flat, "sliding_attention") == dict(rope_type="default", rope_theta=5e5)

