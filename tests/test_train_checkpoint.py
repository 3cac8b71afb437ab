"""Checkpointer: keep-last ∪ keep-best retention, atomic saves, round trips of sharded trees."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.model.config import ModelConfig
from jaxtune.model.sharding import make_mesh, tree_shardings
from jaxtune.model.transformer import Transformer
from jaxtune.train.checkpoint import Checkpointer, content_hash, from_nested, provenance, to_nested


def _state(mesh=None):
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, scan_layers=True)
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    if mesh is not None:
        params = jax.device_put(params, tree_shardings(params, mesh))
    tx = optax.adamw(1e-3)
    return params, tx.init(params)


def test_latest_and_best_are_both_kept(tmp_path):
    params, opt = _state()
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1, async_save=True)
    for step, loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0]):
        ckpt.save(step, params, opt, {"step": step, "eval_loss": loss}, eval_loss=loss)
    ckpt.wait()
    # The latest (and worst) step survives: it is the one a resume needs.
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.latest_step() == 5 and ckpt.best_step() == 2
    ckpt.close()


def test_sharded_state_round_trips_exactly(tmp_path):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, opt = _state(mesh)
    opt = jax.tree.map(lambda x: x + 1, opt)
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(7, params, opt, {"step": 7, "data_state": {"grain": "{\"next_index\": 3}"}})
    ckpt.close()
    like_p, like_o = _state(mesh)
    p2, o2, meta = Checkpointer(tmp_path).restore(None, like_p, like_o)
    assert meta["step"] == 7 and meta["data_state"]["grain"] == "{\"next_index\": 3}"
    for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves((p2, o2))):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    q = p2["layers"]["self_attn"]["q_proj"]["weight"]
    assert q.sharding == params["layers"]["self_attn"]["q_proj"]["weight"].sharding
    assert type(o2[0].mu) is type(opt[0].mu)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    params, opt = _state()
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(1, params, opt, {"step": 1})
    ckpt.wait()
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.save(2, params, opt, {"step": 2, "oops": object()})  # dies half-way through writing
        ckpt.wait()
    again = Checkpointer(tmp_path, keep_last=3)
    assert again.all_steps() == [1]
    _, _, meta = again.restore(None, params, opt)
    assert meta == {"step": 1}


def test_nested_form_is_invertible():
    params, opt = _state()
    nested = to_nested(opt)
    assert set(nested["0"]) == {"count", "mu", "nu"}
    back = from_nested(nested, opt)
    assert jax.tree.structure(back) == jax.tree.structure(opt)


def test_provenance_hashes_what_trains():
    a = [{"input_ids": np.arange(5, dtype=np.int32)}]
    b = [{"input_ids": np.arange(5, dtype=np.int64)}]
    assert content_hash(a) == content_hash([{"input_ids": np.arange(5, dtype=np.int32)}])
    assert content_hash(a) != content_hash(b)
    prov = provenance(data_hash=content_hash(a))
    assert prov["versions"]["jax"] == jax.__version__ and prov["data_hash"] == content_hash(a)


def test_disk_full_names_the_last_good_step_and_keeps_it(tmp_path, monkeypatch):
    import errno

    from jaxtune.train.checkpoint import CheckpointWriteError

    params, opt = _state()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=1)
    ckpt.save(1, params, opt, {"step": 1})
    real = Checkpointer._write

    def disk_full(self, step, *args):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *args)

    monkeypatch.setattr(Checkpointer, "_write", disk_full)
    with pytest.raises(CheckpointWriteError) as e:
        ckpt.save(2, params, opt, {"step": 2})
    ckpt.close()  # the failure is reported once, not again on close
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"{tmp_path}: saving checkpoint step 2 failed: No space left on device; the last good "
                            "checkpoint is step 1, left intact (free space, then resume with --resume)")
    again = Checkpointer(tmp_path / "checkpoints")
    assert again.all_steps() == [1] and again.restore(None, params, opt)[2] == {"step": 1}
    again.close()
