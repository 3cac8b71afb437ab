"""`cpu_flash`, the fused C++ kernel for XLA:CPU: same visibility, values and gradients as the reference,
built once per machine, and a clean fallback where it cannot be built. (Whole-model and cached-query checks
run for every backend in test_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import SCORE_VARIANTS, WINDOWS, _tiny_model, check_against_reference, make_inputs

from jaxtune.model import attention as attn
from jaxtune.model.attention import cpu_flash as ca

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not ca.ensure_built(),
                                reason="cpu_flash needs the CPU backend and a C++ compiler")


@pytest.mark.parametrize("window,sliding", WINDOWS)
@pytest.mark.parametrize("t", [200, 256, 7])
def test_matches_reference(t, window, sliding):
    """Packed rows, right padding, windows static / off / traced; 200 and 7 are not multiples of the tiles."""
    check_against_reference(ca.attention, t=t, window=window, sliding=sliding)


@pytest.mark.parametrize("d", [12, 16, 24, 64, 128])
def test_head_dims(d):
    """Heads below 16 dims and 16-multiples take different accumulation paths in the kernel; 12 and 24 run
    zero-padded to 16 and 32."""
    check_against_reference(ca.attention, t=150, window=40, sliding="traced", d=d, atol=2e-5)


@pytest.mark.parametrize("variant", SCORE_VARIANTS)
@pytest.mark.parametrize("d", [8, 32])
def test_scale_and_softcap(d, variant):
    """The kernel's soft-cap (and its slope 1 - tanh² in the backward) in both forward paths: rows in lanes
    (head dim 8) and keys in lanes (32); 200 rows are not a multiple of the tiles."""
    check_against_reference(ca.attention, t=200, d=d, **variant)


def test_bf16_inputs_are_computed_in_fp32():
    check_against_reference(ca.attention, t=130, dtype=jnp.bfloat16, atol=2e-2)


def test_rows_that_see_nothing_give_zero_and_no_gradient():
    q, k, v, idx, seg = make_inputs(t=70)
    seg = seg.at[1].set(0)
    f = lambda q, k, v: ca.attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg,  # noqa: E731
                                               window=None)
    assert float(jnp.abs(f(q, k, v)[1]).max()) == 0.0
    gq, gk, gv = jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2))(q, k, v)
    assert np.isfinite(np.asarray(gq)).all() and float(jnp.abs(gk[1]).max()) == 0.0


def test_vmap_and_sharded_inputs():
    """vmap runs the call per element; inputs sharded over 8 devices are gathered (XLA replicates a custom
    call it cannot partition), and the result is the same."""
    q, k, v, idx, seg = make_inputs(t=64, b=4)
    kw = dict(q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None)
    want = np.asarray(ca.attention(q, k, v, **kw))
    per_row = jax.vmap(lambda q, k, v, i, s: ca.attention(q[None], k[None], v[None], q_idx=i[None],
                                                                     k_idx=i[None], q_seg=s[None], k_seg=s[None],
                                                                     window=None)[0])(q, k, v, idx, seg)
    np.testing.assert_allclose(per_row, want, atol=1e-6)
    if jax.device_count() >= 4:
        mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        args = [jax.device_put(x, shard) for x in (q, k, v, idx, seg)]
        got = jax.jit(lambda q, k, v, i, s: ca.attention(q, k, v, q_idx=i, k_idx=i, q_seg=s, k_seg=s,
                                                                    window=None))(*args)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_auto_picks_cpu_flash_on_one_device_only(monkeypatch):
    q = jnp.zeros((1, 256, 4, 8), jnp.float32)
    monkeypatch.setattr(attn, "platform", lambda: "cpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert attn.default_impl(q, q) == "cpu_flash"
    assert attn.default_impl(q, q, softcap=30.0) == "cpu_flash"
    assert attn.default_impl(jnp.zeros((1, 256, 4, 512)), jnp.zeros((1, 256, 4, 512))) == "blockwise"  # head dim
    assert attn.default_impl(q[:, :1], q) == "xla"  # decode
    monkeypatch.setattr(ca, "available", lambda: False)
    assert attn.default_impl(q, q) == "blockwise"
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    monkeypatch.setattr(ca, "available", lambda: True)
    assert attn.default_impl(q, q) == "blockwise"


def test_unsupported_head_dim_is_refused():
    q, k, v, idx, seg = make_inputs(t=16, d=264)
    with pytest.raises(ValueError, match="head_dim"):
        ca.attention(q, k, v, q_idx=idx, k_idx=idx, q_seg=seg, k_seg=seg, window=None)


def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(ca.KernelUnavailable, match="building cpu_flash.cc failed"):
        ca.library_path()
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ca.KernelUnavailable):
        ca.library_path()
    monkeypatch.delenv("CXX")
    capsys.readouterr()
    built = ca.library_path()
    assert built.parent == tmp_path / "cache" / "kernels" and built.stat().st_size > 0
    assert len(capsys.readouterr().err.splitlines()) == 1  # one line while it compiles
    mtime = built.stat().st_mtime_ns
    assert ca.library_path() == built and built.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert capsys.readouterr().err == ""  # and silent


def test_model_builds_the_kernel_before_tracing(tmp_path, monkeypatch):
    """Constructing a model that may run cpu_flash builds the kernel; tracing never does."""
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ca, "_ready", None)
    loaded = []
    monkeypatch.setattr(ca, "_load", loaded.append)  # this process registered the kernel already
    model = _tiny_model("cpu_flash")
    assert [p.parent for p in loaded] == [tmp_path / "kernels"] and ca.available()
    monkeypatch.setattr(ca, "library_path", lambda: pytest.fail("cpu_flash was built while tracing"))
    jax.jit(lambda ids: model(ids))(jnp.ones((1, 16), jnp.int32))


def test_auto_builds_the_kernel_only_where_it_may_pick_it(monkeypatch):
    calls = []
    monkeypatch.setattr(ca, "ensure_built", lambda: calls.append(1) or True)
    monkeypatch.setattr(attn, "platform", lambda: "cpu")
    attn.prepare("auto")  # the suite runs on 8 devices: auto never picks cpu_flash
    attn.prepare("blockwise")
    assert calls == []
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    attn.prepare("auto")
    assert calls == [1]
    monkeypatch.setattr(attn, "platform", lambda: "gpu")
    with pytest.raises(ValueError, match="CPU kernel"):
        attn.prepare("cpu_flash")


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (fake) devices")
def test_explicit_cpu_flash_is_refused_on_a_multi_device_mesh():
    """XLA partitions the custom call only by replicating it: a named cpu_flash on a mesh of several
    devices is an error, not a silent gather; without a mesh the same model runs."""
    from flax import nnx

    from jaxtune.model.sharding import make_mesh

    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    graphdef, state = nnx.split(_tiny_model("cpu_flash"))
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ids = jnp.ones((2, 16), jnp.int32)
    sharded = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    with pytest.raises(ValueError, match="cpu_flash.*2-device mesh"):
        forward(state, sharded)
    assert forward(state, ids).shape == (2, 16, 96)
