"""Logit parity with transformers (fp32, ≤1e-4) per family and feature, and proof each test can fail."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import VARIANTS, torch_logits

from jaxtune import load_pretrained
from jaxtune.hf.load import CheckpointError
from jaxtune.model.attention import xla as attention_mod

ATOL = 1e-4
B, T = 2, 24  # T > every sliding window in the zoo


def _ids(vocab: int, seed: int = 0, shape=(B, T)) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab), np.int32)


def _max_diff(model, hf_model, ids, **kw) -> float:
    return float(np.abs(np.asarray(model(jnp.asarray(ids), **kw)) - torch_logits(hf_model, ids)).max())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logit_parity(hf_zoo, name):
    path, hf = hf_zoo(name)
    model = load_pretrained(path)
    ids = _ids(model.config.vocab_size)
    assert _max_diff(model, hf, ids) <= ATOL


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3_window", "mistral_window"])
def test_scanned_layout_parity(hf_zoo, name):
    path, hf = hf_zoo(name)
    model = load_pretrained(path, scan_layers=True, remat="full")
    assert model.layers.self_attn.q_proj.weight.shape[0] == model.config.num_hidden_layers
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) <= ATOL


def test_right_and_left_padded_batch(hf_zoo):
    path, hf = hf_zoo("qwen2_bias")
    model = load_pretrained(path)
    ids = _ids(model.config.vocab_size)
    lengths = np.array([T, 13])
    right = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(right)))
    ref = torch_logits(hf, ids, attention_mask=right)
    assert np.abs((ours - ref)[right.astype(bool)]).max() <= ATOL

    left = right[:, ::-1].copy()
    pos = np.maximum(np.cumsum(left, 1) - 1, 0).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids), segment_ids=jnp.asarray(left), positions=jnp.asarray(pos)))
    ref = torch_logits(hf, ids, attention_mask=left, position_ids=pos)
    assert np.abs((ours - ref)[left.astype(bool)]).max() <= ATOL


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3_window"])
def test_packed_segments_match_separate_runs(hf_zoo, name):
    path, hf = hf_zoo(name)
    model = load_pretrained(path)
    lens = [9, 11, 3]
    seqs = [_ids(model.config.vocab_size, seed=s, shape=(1, n))[0] for s, n in zip(range(3), lens)]
    row = np.zeros((1, T), np.int32)
    seg = np.zeros((1, T), np.int32)
    start = 0
    for s, x in enumerate(seqs, 1):
        row[0, start:start + len(x)], seg[0, start:start + len(x)] = x, s
        start += len(x)
    ours = np.asarray(model(jnp.asarray(row), segment_ids=jnp.asarray(seg)))
    start = 0
    for x in seqs:
        ref = torch_logits(hf, x[None])[0]
        assert np.abs(ours[0, start:start + len(x)] - ref).max() <= ATOL
        start += len(x)


# --- each feature of the matrix, switched off, must break its parity test -------------------------------

def _attn_modules(model):
    return [layer.self_attn for layer in model.layers]


def test_off_switch_rope_scaling(hf_zoo):
    for name in ("llama3_rope", "llama_linear_rope"):
        path, hf = hf_zoo(name)
        model = load_pretrained(path)
        for attn in _attn_modules(model):
            attn.cfg = attn.cfg.replace(rope_type="default")
        assert _max_diff(model, hf, _ids(model.config.vocab_size)) > 1e-2


def test_off_switch_qkv_bias(hf_zoo):
    path, hf = hf_zoo("qwen2_bias")
    model = load_pretrained(path)
    for attn in _attn_modules(model):
        attn.q_proj.bias = attn.k_proj.bias = attn.v_proj.bias = None
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) > 1e-2


def test_off_switch_qk_norm(hf_zoo):
    path, hf = hf_zoo("qwen3")
    model = load_pretrained(path)
    for attn in _attn_modules(model):
        attn.cfg = attn.cfg.replace(qk_norm="none")
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) > 1e-2


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_window", "qwen3_window"])
def test_off_switch_sliding_window(hf_zoo, name):
    path, hf = hf_zoo(name)
    model = load_pretrained(path)
    model.config = model.config.replace(sliding_layers=(False,) * model.config.num_hidden_layers)
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) > 1e-2


@pytest.mark.parametrize("name,scan,want", [
    ("mistral_window", False, [True, True]), ("mistral_window", True, [True]),  # scan traces the body once
    ("qwen3_window", False, [False, True, True]), ("qwen3_window", True, ["traced"]),
    ("llama_gqa", True, [False])])
def test_sliding_flag_reaches_attention_static_when_it_can(hf_zoo, monkeypatch, name, scan, want):
    """Attention gets each layer's window flag as a Python bool (one kernel variant, no `lax.cond`, and
    `blockwise` skips blocks outside the window) unless scanned layers differ, which needs a traced flag."""
    from jaxtune.model import transformer

    path, _ = hf_zoo(name)
    # Unrolled without remat, so every layer traces its own call (remat would reuse one trace for equal layers).
    model = load_pretrained(path, scan_layers=scan, remat="full" if scan else "none")
    seen, real = [], transformer.attention

    def spy(*a, sliding, **kw):
        seen.append(sliding if isinstance(sliding, bool) else "traced")
        return real(*a, sliding=sliding, **kw)

    monkeypatch.setattr(transformer, "attention", spy)
    model(jnp.asarray(_ids(model.config.vocab_size)))
    assert seen == want


def test_window_edge_is_exact(hf_zoo, monkeypatch):
    """HF's rule is `q - W < k <= q`; an off-by-one (`q - W <= k`) must fail parity. (Dense backend: the
    others are checked against it in test_attention.py.)"""
    path, hf = hf_zoo("mistral_window")
    model = load_pretrained(path, attention_impl="xla")
    ids = _ids(model.config.vocab_size)
    assert _max_diff(model, hf, ids) <= ATOL
    right = attention_mod.visibility

    def off_by_one(q_idx, k_idx, q_seg, k_seg, window, sliding=True):
        return right(q_idx, k_idx, q_seg, k_seg, None if window is None else window + 1, sliding)

    monkeypatch.setattr(attention_mod, "visibility", off_by_one)
    assert _max_diff(model, hf, ids) > 1e-2


def test_off_switch_gqa_grouping(hf_zoo, monkeypatch):
    """Query head h reads kv head h // groups; tiling kv heads instead (h % kv_heads) must fail parity."""
    path, hf = hf_zoo("llama_gqa")
    model = load_pretrained(path, attention_impl="xla")
    ids = _ids(model.config.vocab_size)

    def tiled(q, k, v, mask, **_):
        g = q.shape[2] // k.shape[2]
        k, v = jnp.tile(k, (1, 1, g, 1)), jnp.tile(v, (1, 1, g, 1))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(mask[:, None], s, attention_mod.NEG_INF), -1)
        return jnp.einsum("bhts,bshd->bthd", p, v)

    monkeypatch.setattr(attention_mod, "xla_attention", tiled)
    assert _max_diff(model, hf, ids) > 1e-2


def test_off_switch_tied_embeddings(hf_zoo, tmp_path):
    """A tied checkpoint has no lm_head tensor: treating it as untied must be refused, not random-filled."""
    path, _ = hf_zoo("llama_tied")
    off = tmp_path / "untied"
    off.mkdir()
    for f in path.iterdir():
        (off / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((off / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (off / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head"):
        load_pretrained(off)


# --- dtypes, checkpoint formats, refusals -------------------------------------------------------------

def test_bf16_load(hf_zoo):
    """bf16 weights+compute: every leaf bf16; logits within 3% of the logit range of the fp32 reference."""
    path, hf = hf_zoo("llama_gqa")
    model = load_pretrained(path, dtype=jnp.bfloat16)
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    ids = _ids(model.config.vocab_size)
    ref = torch_logits(hf, ids)
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    assert np.abs(ours - ref).max() <= 0.03 * (ref.max() - ref.min())


def test_sharded_index_checkpoint(hf_zoo, tmp_path):
    _, hf = hf_zoo("qwen2_bias")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_pretrained(tmp_path)
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) <= ATOL


def test_sharded_load_onto_mesh(hf_zoo):
    from jaxtune.model.sharding import make_mesh

    path, hf = hf_zoo("llama_gqa")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_pretrained(path, mesh=mesh)
    spec = model.layers[0].self_attn.q_proj.weight[...].sharding.spec
    assert tuple(spec) == ("tensor", "fsdp")
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) <= ATOL


def test_pickle_weights_refused_unless_opted_in(hf_zoo, tmp_path):
    import shutil

    import torch

    path, hf = hf_zoo("llama_gqa")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_pretrained(tmp_path)
    model = load_pretrained(tmp_path, allow_pickle=True)
    assert _max_diff(model, hf, _ids(model.config.vocab_size)) <= ATOL


@pytest.mark.parametrize("edit, field", [
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_fields_fail_loudly(hf_zoo, tmp_path, edit, field):
    from jaxtune.hf.families import from_hf_config
    from jaxtune.model.config import UnsupportedConfigError
    from transformers import LlamaConfig

    path, _ = hf_zoo("llama_gqa")
    cfg = {**json.loads((path / "config.json").read_text()), **edit}
    if edit.get("model_type") == "gpt_neox":
        hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        hf_cfg.model_type = "gpt_neox"
    else:
        hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with pytest.raises(UnsupportedConfigError, match=field):
        from_hf_config(hf_cfg)


def test_mistral_attention_bias_refused():
    from jaxtune.hf.families import from_hf_config
    from jaxtune.model.config import UnsupportedConfigError
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    cfg.attention_bias = True
    with pytest.raises(UnsupportedConfigError, match="attention_bias"):
        from_hf_config(cfg)


def test_config_values_come_from_loaded_config(hf_zoo):
    """Qwen3Config defaults head_dim to 128; ours must be the checkpoint's 24."""
    path, _ = hf_zoo("qwen3")
    model = load_pretrained(path)
    assert model.config.head_dim == 24 and model.config.qk_norm and model.config.tie_word_embeddings
    cfg = load_pretrained(hf_zoo("qwen3_window")[0]).config
    assert cfg.sliding_layers == (False, True, True) and cfg.sliding_window == 6


# --- the real model -----------------------------------------------------------------------------------

def test_real_stories260k_parity(stories_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    ids = tok("Once upon a time, there was a little girl named Lily. She loved to play outside.",
              return_tensors="np")["input_ids"]
    model = load_pretrained(stories_dir)
    assert model.lm_head is None and model.config.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    hf.eval()
    assert _max_diff(model, hf, ids) <= ATOL
