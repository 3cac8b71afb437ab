"""Every attention backend computes `visibility` exactly like the dense reference, values and gradients.

Padding query rows (segment 0) are excluded from comparisons: they see no key, so every backend leaves
garbage there (differently), and nothing downstream reads them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.model import attention as attn
from jaxtune.model.attention import attention, blockwise, cudnn, splash
from jaxtune.model.attention import cpu_flash as ca
from jaxtune.model.attention import mask as mask_mod
from jaxtune.model.attention.mask import visibility
from jaxtune.model.attention.xla import xla_attention
from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import Transformer

ON_GPU = jax.default_backend() == "gpu"


def make_inputs(t=200, b=3, h=4, kh=2, d=8, layout="mixed", seed=0, dtype=jnp.float32):
    """GQA inputs; `mixed` rows: one full, one right-padded, one packed with three segments and padding."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))
    seg = np.zeros((b, t), np.int32)
    seg[0] = 1
    seg[1, : t - 37] = 1
    if layout == "mixed":
        bounds = np.cumsum([0, t // 4, 13, t // 3, t // 5])
        for s in range(len(bounds) - 1):
            seg[2, bounds[s]: bounds[s + 1]] = s + 1
    else:
        seg[2, : t // 2] = 3
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return q, k, v, idx, jnp.asarray(seg)


def check_against_reference(fn, t=200, window=None, sliding=True, layout="mixed", atol=1e-5, dtype=jnp.float32,
                            d=8, scale=None, softcap=None):
    """`fn` on `dtype` inputs against the dense reference on the same values in fp32: outputs on real rows
    and the gradients of a weighted sum of them with respect to q, k and v, under score `scale` and `softcap`."""
    extra = {"scale": scale, "softcap": softcap}
    q, k, v, idx, seg = make_inputs(t=t, layout=layout, dtype=dtype, d=d)
    valid = (seg != 0)[..., None, None]
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def ref(q, k, v, s):
        return xla_attention(q, k, v, visibility(idx, idx, seg, seg, window, s), **extra)

    def impl(q, k, v, s):
        return fn(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=window, sliding=s, **extra)

    def loss(f):
        return lambda q, k, v, s: jnp.sum(jnp.where(valid, f(q, k, v, s).astype(jnp.float32) * w, 0))

    # A traced `sliding` (scanned layers with mixed window layers) goes in as an argument; a static one is closed over.
    if sliding == "traced":
        run = lambda f: jax.jit(f)  # noqa: E731
        s = jnp.asarray(True)
    else:
        run = lambda f: jax.jit(lambda q, k, v, _: f(q, k, v, sliding))  # noqa: E731
        s = sliding
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, want = run(impl)(q, k, v, s), run(ref)(*f32, s)
    np.testing.assert_allclose(np.where(valid, out.astype(jnp.float32), 0), np.where(valid, want, 0),
                               atol=atol, rtol=atol)
    grads = run(jax.grad(loss(impl), (0, 1, 2)))(q, k, v, s)
    want_g = run(jax.grad(loss(ref), (0, 1, 2)))(*f32, s)
    for g, wg in zip(grads, want_g):
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(wg), atol=atol, rtol=atol)


def cudnn_as_xla(q, k, v, **kw):
    return cudnn.attention(q, k, v, implementation="xla", **kw)


WINDOWS = [(None, True), (16, True), (16, False), (16, "traced")]


@pytest.mark.parametrize("t,window,sliding", [(200, w, s) for w, s in WINDOWS] + [(256, 16, True)])
def test_blockwise_matches_reference(t, window, sliding):
    """Lengths 200 (padded to whole blocks) and 256; with a static window, blocks outside it are skipped."""
    check_against_reference(blockwise.attention, t=t, window=window, sliding=sliding)


@pytest.mark.parametrize("layout,window,sliding", [("mixed", w, s) for w, s in WINDOWS] +
                         [("single", None, True), ("single", 16, "traced")])
def test_cudnn_arguments_express_visibility(layout, window, sliding):
    """The cuDNN call's arguments, run through JAX's reference `dot_product_attention`, give the same
    attention: both the sequence-length path (one segment per row) and the packed-mask path."""
    check_against_reference(cudnn_as_xla, t=96, window=window, sliding=sliding, layout=layout)


def test_single_segment_rows():
    _, _, _, _, mixed = make_inputs(layout="mixed")
    _, _, _, _, single = make_inputs(layout="single")
    assert not bool(cudnn.single_segment_rows(mixed))
    assert bool(cudnn.single_segment_rows(single))
    assert not bool(cudnn.single_segment_rows(jnp.asarray([[1, 1, 0, 1]])))


@pytest.mark.parametrize("window,sliding", [(None, True), (40, "traced")])
def test_splash_matches_reference_in_interpret_mode(window, sliding):
    check_against_reference(splash.attention, t=128, window=window, sliding=sliding)


# Score variants: Granite/Gemma-style non-default scale, Gemma 2's logit soft-cap, and both on a sliding window
# over packed rows. At head_dim 8 scores have std 1 under the default scale and about 2 under 0.7, so a cap of
# 2 changes every row: a backend that drops or misplaces the cap, or ignores the scale, fails.
SCORE_VARIANTS = [
    pytest.param({"scale": 0.7}, id="scale"),
    pytest.param({"softcap": 2.0}, id="softcap"),
    pytest.param({"scale": 0.7, "softcap": 2.0, "window": 16, "sliding": "traced"}, id="both-window-traced"),
    pytest.param({"scale": 0.7, "softcap": 2.0, "window": 16, "sliding": True}, id="both-window-static"),
]


def test_reference_scores_as_hf_eager():
    """The reference is HF's eager attention (Gemma 2's, which scales, soft-caps, then masks) on the same
    inputs, and the cap and scale each change its result."""
    torch = pytest.importorskip("torch")
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, idx, seg = make_inputs(t=40)
    mask = visibility(idx, idx, seg, seg, 16, True)
    valid = np.asarray(seg != 0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = q.shape[2] // k.shape[2], q.shape[3]
    module.eval()

    def t(x):  # [B,T,H,D] -> HF's [B,H,T,D]
        return torch.from_numpy(np.array(x)).transpose(1, 2)

    additive = torch.from_numpy(np.where(np.asarray(mask), 0.0, np.finfo(np.float32).min)[:, None].astype(np.float32))
    outs = {}
    for scale, softcap in ((None, None), (0.7, None), (None, 2.0), (0.7, 2.0)):
        want = eager_attention_forward(module, t(q), t(k), t(v), additive, scaling=scale, softcap=softcap)[0].numpy()
        got = np.asarray(xla_attention(q, k, v, mask, scale=scale, softcap=softcap))
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)
        outs[scale, softcap] = got[valid]
    assert len({np.round(o, 3).tobytes() for o in outs.values()}) == 4


def test_folded_scale_is_not_rounded_to_bf16():
    """Kernels that fold the scale into bf16 q multiply in fp32: Gemma 2 27B's 224**-0.5 rounded to bf16 would
    scale every score 0.12% high; products rounded once are off by at most half a bf16 step, with no bias."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal(4096), jnp.bfloat16).astype(jnp.float32)
    scale = 224 ** -0.5
    rel = np.asarray(mask_mod.scaled_q(x.astype(jnp.bfloat16), scale).astype(jnp.float32) / (x * scale) - 1)
    assert np.abs(rel).max() <= 2.0 ** -8 and abs(rel.mean()) < 2e-4


@pytest.mark.parametrize("variant", SCORE_VARIANTS)
def test_blockwise_scale_and_softcap(variant):
    check_against_reference(blockwise.attention, t=72, **variant)


def test_splash_scale_and_softcap_in_interpret_mode():
    """The scale folded into q, splash's own `attn_logits_soft_cap` on the scaled scores."""
    check_against_reference(splash.attention, t=128, scale=0.7, softcap=2.0, window=40, sliding="traced")


# Lengths that tile into several splash blocks at each block size `splash_kernel` picks (the largest of 512, 256
# and 128 that divides t): 3 x 128, 3 x 256 and 2 x 512. Values and q/k/v gradients both go through the blocks.
SPLASH_BLOCKS = [(384, 128), (768, 256), (1024, 512)]


@pytest.mark.parametrize("t,block", SPLASH_BLOCKS)
def test_splash_multi_block_packed_rows_in_interpret_mode(t, block):
    """Causal splash over several q and kv blocks, with row 2's packed documents crossing every block boundary
    (a segment id lost between blocks lets a document see its neighbour)."""
    row = np.asarray(make_inputs(t=t)[4][2])
    assert len(set(row.tolist()) - {0}) >= 3
    assert all(row[i - 1] == row[i] != 0 for i in range(block, t, block))
    check_against_reference(splash.attention, t=t)


@pytest.mark.parametrize("t,window,sliding", [
    pytest.param(384, 40, True, id="384-w40"),  # kv blocks two back are outside the window: skipped
    pytest.param(384, 300, True, id="384-w300"),  # blocks one back are whole; the window edge cuts two back
    pytest.param(1024, 600, True, id="1024-w600"),  # the edge cuts the 512-block one back
    pytest.param(384, 40, False, id="384-w40-off"),  # a full-attention layer of a windowed model: causal
])
def test_splash_static_window_over_blocks_in_interpret_mode(t, window, sliding):
    """A window known at trace time (a Python bool `sliding`) picks a local or a causal mask over several
    blocks; a window one slot too wide or narrow, or applied to a full layer, moves every row past it."""
    check_against_reference(splash.attention, t=t, window=window, sliding=sliding)


def test_cudnn_arguments_carry_the_scale():
    check_against_reference(cudnn_as_xla, t=96, scale=0.7, window=16, sliding=True)


def test_cudnn_refuses_softcap():
    """cuDNN has no logit soft-cap: asking for one names the backends that have it, on every path (self and
    cached attention) and through the common interface."""
    q, k, v, idx, seg = make_inputs(t=16)
    kw = {"q_idx": idx, "k_idx": idx, "q_seg": seg, "k_seg": seg, "window": None, "softcap": 2.0}
    message = "cuDNN attention cannot soft-cap.*'auto', 'xla' or 'blockwise'"
    with pytest.raises(ValueError, match=message):
        cudnn.attention(q, k, v, implementation="xla", **kw)
    with pytest.raises(ValueError, match=message):
        cudnn.attention(q[:, :1], k, v, **{**kw, "q_idx": idx[:, :1], "q_seg": seg[:, :1]})
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, impl="cudnn", **kw)
    assert cudnn.attention(q, k, v, implementation="xla", **{**kw, "softcap": None}).shape == q.shape


def test_softcap_must_be_positive():
    q, k, v, idx, seg = make_inputs(t=16)
    with pytest.raises(ValueError, match="positive cap"):
        attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None, impl="xla", softcap=0.0)


def test_auto_never_picks_cudnn_to_soft_cap(monkeypatch):
    """On GPU a soft-capped layer runs `blockwise` where cuDNN would otherwise run; the common interface hands
    the cap to that choice (cuDNN would raise)."""
    monkeypatch.setattr(attn, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "supported_gpu", lambda: True)
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    assert attn.default_impl(q, q) == "cudnn"
    assert attn.default_impl(q, q, softcap=50.0) == "blockwise"
    monkeypatch.setattr(attn, "platform", lambda: "tpu")
    assert attn.default_impl(q, q, softcap=50.0) == "splash"
    monkeypatch.setattr(attn, "platform", lambda: "gpu")
    q, k, v, idx, seg = make_inputs(t=16, dtype=jnp.bfloat16)
    got = attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None, scale=0.7, softcap=2.0)
    want = blockwise.attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None, scale=0.7,
                               softcap=2.0)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


CACHED_IMPLS = [lambda q, k, v, **kw: blockwise.attention(q, k, v, block=32, **kw),
                lambda q, k, v, **kw: ca.attention(q, k, v, **kw)]
NEEDS_CPU_FLASH = pytest.mark.skipif(jax.default_backend() != "cpu" or not ca.ensure_built(),
                                     reason="cpu_flash needs the CPU backend and a C++ compiler")
IMPLS = ["blockwise", pytest.param("cpu_flash", marks=NEEDS_CPU_FLASH)]


@pytest.mark.parametrize("fn", [CACHED_IMPLS[0], pytest.param(CACHED_IMPLS[1], marks=NEEDS_CPU_FLASH)],
                         ids=["blockwise", "cpu_flash"])
def test_cached_queries_match_reference(fn):
    """KV-cache shape: 5 new queries at slots 40..44 over a 96-slot cache with empty slots past 45; plain, with
    a window, and with a window, a scale and a soft-cap."""
    rng = np.random.default_rng(2)
    b, t, s, h, kh, d = 2, 5, 96, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kh, d)), jnp.float32) for _ in range(2))
    q_idx = 40 + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    k_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_seg = jnp.asarray((np.arange(s)[None] < 45) & (np.arange(s)[None] >= [[0], [7]]), jnp.int32)
    q_seg = jnp.ones((b, t), jnp.int32)
    for window, scale, softcap in ((None, None, None), (9, None, None), (9, 0.7, 2.0)):
        kw = {"q_idx": q_idx, "k_idx": k_idx, "q_seg": q_seg, "k_seg": k_seg, "window": window, "sliding": True,
              "scale": scale, "softcap": softcap}
        want = xla_attention(q, k, v, visibility(q_idx, k_idx, q_seg, k_seg, window, True), scale=scale,
                             softcap=softcap)
        got = jax.jit(lambda q, k, v: fn(q, k, v, **kw))(q, k, v)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_diagonals_skip_invisible_blocks():
    def pairs(diags):
        return sorted((i, i - o) for o, a, e in diags for i in range(a, e))

    full = [(i, j) for i in range(4) for j in range(4)]
    assert pairs(blockwise.diagonals(4, 4, causal=False, window_blocks=None)) == full
    causal = [(i, j) for i in range(4) for j in range(i + 1)]
    assert pairs(blockwise.diagonals(4, 4, causal=True, window_blocks=None)) == causal
    # Over 32-slot blocks a 16- or 33-slot window reaches one block back (row 64 sees keys > 64 - 33 = 31);
    # 34 slots reach key 31, two blocks back.
    assert [blockwise.window_blocks(w, 32) for w in (16, 33, 34)] == [1, 1, 2]
    assert blockwise.window_blocks(1, 32) == 0
    assert pairs(blockwise.diagonals(4, 4, causal=True, window_blocks=1)) == [
        (i, j) for i in range(4) for j in range(max(0, i - 1), i + 1)]
    assert pairs(blockwise.diagonals(1, 3, causal=False, window_blocks=None)) == [(0, 0), (0, 1), (0, 2)]
    assert blockwise.block_size(256) == 64 and blockwise.block_size(4096) == 256 and blockwise.block_size(100) == 64
    assert blockwise.block_size(20) == 24


def test_default_impl_by_platform_and_shape(monkeypatch):
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    decode = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    monkeypatch.setattr(attn, "platform", lambda: "cpu")
    assert attn.default_impl(q, q) == "blockwise"
    assert attn.default_impl(decode, q) == "xla"
    assert attn.default_impl(q[:, :5], q[:, :5]) == "blockwise"
    monkeypatch.setattr(attn, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "supported_gpu", lambda: True)
    assert attn.default_impl(q, q) == "cudnn"
    assert attn.default_impl(q.astype(jnp.float32), q.astype(jnp.float32)) == "blockwise"
    monkeypatch.setattr(cudnn, "supported_gpu", lambda: False)  # a T4: cuDNN's fused attention needs Ampere+
    assert attn.default_impl(q, q) == "blockwise"
    monkeypatch.setattr(attn, "platform", lambda: "tpu")
    assert attn.default_impl(q, q) == "splash"
    assert attn.default_impl(q[:, :200], q[:, :200]) == "blockwise"


def test_unknown_impl_names_the_choices():
    q, k, v, idx, seg = make_inputs(t=8)
    with pytest.raises(ValueError, match="blockwise"):
        attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None, impl="flash3")


def _tiny_model(impl, **kw):
    cfg = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_impl=impl, **kw)
    return Transformer(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("impl", IMPLS)
def test_model_backend_matches_xla(impl):
    """Whole-model logits and parameter gradients are unchanged by the backend: packed rows, scanned and
    rematerialised layers whose per-layer window flag is traced."""
    runtime = dict(scan_layers=True, remat="full", sliding_window=24, sliding_layers=(True, False))
    _, _, _, _, seg = make_inputs(t=100)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 96, seg.shape), jnp.int32)
    valid = np.asarray(seg != 0)[..., None]
    graphdef_x, state = nnx.split(_tiny_model("xla", **runtime))
    graphdef_b, _ = nnx.split(_tiny_model(impl, **runtime))

    def loss(graphdef):
        def f(state):
            logits = nnx.merge(graphdef, state)(ids, seg)
            return jnp.sum(jnp.where(valid[..., 0], jax.nn.log_softmax(logits)[..., 0], 0))
        return jax.jit(jax.value_and_grad(f))

    def forward(graphdef):
        return jax.jit(lambda state: nnx.merge(graphdef, state)(ids, seg))(state)

    out_x, out_b = forward(graphdef_x), forward(graphdef_b)
    np.testing.assert_allclose(np.where(valid, out_b, 0), np.where(valid, out_x, 0), atol=1e-5, rtol=1e-5)
    (lx, gx), (lb, gb) = loss(graphdef_x)(state), loss(graphdef_b)(state)
    np.testing.assert_allclose(lb, lx, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_window", "qwen3"])
def test_backend_model_matches_transformers(tmp_path, variant, impl):
    """Logit parity with HF eager (the parity suite's bar) holds per backend on padded inputs (qwen3's head
    dim 24 runs zero-padded to 32 in `cpu_flash`)."""
    hf_models = pytest.importorskip("hf_models")
    from jaxtune.hf.load import load_pretrained

    torch_model = hf_models.build(variant, tmp_path)
    ids = np.random.default_rng(5).integers(0, 128, (2, 100))
    mask = np.ones_like(ids)
    mask[1, 70:] = 0
    want = hf_models.torch_logits(torch_model, ids, attention_mask=mask)
    model = load_pretrained(tmp_path, attention_impl=impl)
    graphdef, state = nnx.split(model)
    got = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, jnp.asarray(ids, jnp.int32),
                                                                           jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU (run by scripts/gpu_check.sh)")
@pytest.mark.parametrize("layout", ["mixed", "single"])
@pytest.mark.parametrize("window,sliding", WINDOWS)
def test_cudnn_matches_reference_on_gpu(layout, window, sliding):
    check_against_reference(cudnn.attention, t=256, window=window, sliding=sliding, layout=layout,
                            atol=3e-2, dtype=jnp.bfloat16, d=64)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU (run by scripts/gpu_check.sh)")
def test_cudnn_scale_on_gpu():
    check_against_reference(cudnn.attention, t=256, window=16, sliding="traced", atol=3e-2, dtype=jnp.bfloat16,
                            d=64, scale=0.3)


@pytest.mark.skipif(not ON_GPU, reason="bf16 blockwise on GPU (run by scripts/gpu_check.sh)")
def test_blockwise_bf16_on_gpu():
    check_against_reference(blockwise.attention, t=256, window=16, sliding="traced", atol=3e-2, dtype=jnp.bfloat16)


def test_cudnn_needs_an_ampere_gpu(monkeypatch):
    """JAX's cuDNN fused attention refuses GPUs before Ampere (Colab's free T4 is 7.5): `auto` must not pick it."""
    import types

    def gpus(*caps):
        return lambda: [types.SimpleNamespace(compute_capability=c) for c in caps]

    monkeypatch.setattr(jax, "local_devices", gpus("7.5"))
    assert not cudnn.supported_gpu()
    monkeypatch.setattr(jax, "local_devices", gpus("8.0", "9.0"))
    assert cudnn.supported_gpu()
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace()])  # a CPU device
    assert not cudnn.supported_gpu()
