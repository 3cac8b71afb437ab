"""Mesh, logical-axis rules and batch sharding: one step on 1 device equals the same step on 8."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jaxtune.model.config import ModelConfig
from jaxtune.model.sharding import (DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_RULES, batch_spec, check_rules,
                                    distributed_args, is_multiprocess_env, logical_to_spec, make_mesh,
                                    maybe_initialize_distributed, shard_batch, tree_shardings)
from jaxtune.model.transformer import Transformer
from jaxtune.train.step import jit_train_step, loss_and_grads

CFG = ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _batch(rows: int = 8, t: int = 16, seed: int = 0) -> dict:
    """Rows of different lengths, one packed row with two segments, and right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (rows, t + 1)).astype(np.int32)
    lengths = rng.integers(3, t + 1, rows)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    seg[0, t // 2:] = 2
    pos = np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)
    pos[0, t // 2:] = np.arange(t - t // 2)
    mask = seg.copy()
    mask[:, 0] = 0
    real = seg > 0
    return {"input_ids": ids[:, :-1] * real, "targets": ids[:, 1:] * real, "loss_mask": (mask > 0).astype(np.int32),
            "segment_ids": seg, "positions": pos}


def test_mesh_axes_are_auto():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert make_mesh({"data": -1}).shape["data"] == len(jax.devices())


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    rules = {**DEFAULT_RULES, "mlp": "fsdp"}
    with pytest.raises(ValueError, match="'mlp' and 'embed' of one tensor both map to mesh axis 'fsdp'"):
        logical_to_spec(("mlp", "embed"), rules)
    state = nnx.state(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match=r"parameter layers/0/mlp/(down|gate|up)_proj/weight: logical axes"):
        check_rules(state, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), rules)


def test_batch_goes_over_data_and_fsdp():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert batch_spec(2, mesh=mesh) == P(("data", "fsdp"), None)
    assert batch_spec(3, accum=True, mesh=mesh) == P(None, ("data", "fsdp"), None)
    arr = shard_batch(_batch(), mesh)["input_ids"]
    assert arr.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 16)}


def test_multiprocess_environment_detection():
    assert not is_multiprocess_env({})
    assert not is_multiprocess_env({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert is_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert is_multiprocess_env({"SLURM_NTASKS": "4"})
    assert is_multiprocess_env({"OMPI_COMM_WORLD_SIZE": "2"})
    assert is_multiprocess_env({"TPU_WORKER_HOSTNAMES": "t1,t2"})


def test_distributed_args_read_the_cluster_and_heartbeat_from_the_environment():
    """JAX reads only JAX_COORDINATOR_ADDRESS itself: the process count and index are read here (None leaves
    them to JAX's SLURM/Open MPI/TPU detection); the heartbeat timeout defaults to 10 s, not JAX's 100 s."""
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_args(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                                     "heartbeat_timeout_seconds": DEFAULT_HEARTBEAT_TIMEOUT}
    assert DEFAULT_HEARTBEAT_TIMEOUT == 10
    assert distributed_args({**env, "JAXTUNE_HEARTBEAT_TIMEOUT": "30"})["heartbeat_timeout_seconds"] == 30
    assert distributed_args({"SLURM_NTASKS": "4"}) == {"coordinator_address": None, "num_processes": None,
                                                      "process_id": None, "heartbeat_timeout_seconds": 10}
    for bad, message in (({**env, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two': expected an integer >= 1"),
                         ({**env, "JAX_PROCESS_ID": "4"}, "JAX_PROCESS_ID=4 must be below JAX_NUM_PROCESSES=4"),
                         ({**env, "JAXTUNE_HEARTBEAT_TIMEOUT": "0"}, "JAXTUNE_HEARTBEAT_TIMEOUT='0': expected")):
        with pytest.raises(ValueError, match=re.escape(message)):
            distributed_args(bad)


def test_a_cloud_tpu_vm_initializes_without_a_cluster_in_its_environment(monkeypatch):
    """A TPU VM made with gcloud names no other worker in its environment: JAX finds them from the metadata
    server, so `initialize()` runs with no cluster arguments; not when JAX_PLATFORMS keeps jax off the TPU."""
    import glob
    import importlib.util

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAXTUNE_HEARTBEAT_TIMEOUT", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else
                        find_spec(name, *a))
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/vfio/0"] if pattern == "/dev/vfio/[0-9]*" else [])
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not maybe_initialize_distributed() and not calls
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert maybe_initialize_distributed()
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                      "heartbeat_timeout_seconds": DEFAULT_HEARTBEAT_TIMEOUT}]
    monkeypatch.setattr(glob, "glob", lambda pattern: [])  # libtpu installed, no chips: an ordinary host
    assert not maybe_initialize_distributed() and len(calls) == 1


def test_initialize_hands_the_environment_to_jax(monkeypatch):
    """`maybe_initialize_distributed` passes `distributed_args` (and an explicit heartbeat) to
    `jax.distributed.initialize`, picks gloo for CPU collectives when none is chosen, and turns JAX's
    complaint about a cluster it cannot work out into one naming the variables to set."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAXTUNE_HEARTBEAT_TIMEOUT", "COORDINATOR_ADDRESS",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert not maybe_initialize_distributed() and not calls  # one host: nothing to start
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:9999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    collectives = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        assert maybe_initialize_distributed(heartbeat_timeout=3)
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    assert calls == [{"coordinator_address": "127.0.0.1:9999", "num_processes": 2, "process_id": 1,
                      "heartbeat_timeout_seconds": 3}]

    def refuse(**kw):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(ValueError, match="Number of processes must be defined. Set JAX_COORDINATOR_ADDRESS"):
        maybe_initialize_distributed()


def _placed(mesh):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, jax.device_put(params, tree_shardings(params, mesh)), jax.device_put(
        frozen, tree_shardings(frozen, mesh))


def _grads(mesh, batch):
    graphdef, params, frozen = _placed(mesh)
    fn = jax.jit(functools.partial(loss_and_grads, mesh=mesh), static_argnums=0)
    grads, (loss, correct, n_loss, _, _) = fn(graphdef, params, frozen, shard_batch(batch, mesh), jax.random.key(0))
    return params, grads, float(loss)


def test_same_step_on_one_and_eight_devices():
    batch = _batch()
    one = make_mesh({"data": 1}, jax.devices()[:1])
    eight = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, g1, loss1 = _grads(one, batch)
    params8, g8, loss8 = _grads(eight, batch)
    assert abs(loss1 - loss8) <= 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), g1, g8)
    assert max(jax.tree.leaves(diffs)) <= 1e-5

    # The parameters really are split as the rules say, not replicated.
    q = params8["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert q.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in q.addressable_shards} == {(16, 16)}
    assert params8["embed_tokens"]["weight"].sharding.spec == P("tensor", "fsdp")
    assert params8["layers"][0]["mlp"]["down_proj"]["weight"].sharding.spec == P("fsdp", "tensor")
    assert params8["norm"]["weight"].sharding.spec == P("fsdp")


def test_train_step_keeps_parameter_shardings():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params, frozen = _placed(mesh)
    tx = optax.adamw(1e-3)
    p_sh = tree_shardings(params, mesh)
    o_sh = tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    step = jit_train_step(tx, mesh=mesh, trainable_shardings=p_sh, opt_shardings=o_sh)
    before = jax.tree.map(lambda x: x.sharding.spec, params)
    for i in range(2):
        params, opt_state, _ = step(graphdef, params, frozen, opt_state, shard_batch(_batch(seed=i), mesh),
                                    jax.random.key(i))
    assert jax.tree.map(lambda x: x.sharding.spec, params) == before
    mu = opt_state[0].mu["layers"][1]["mlp"]["up_proj"]["weight"]
    assert mu.sharding.spec == P("tensor", "fsdp")
    assert step._cache_size() == 1


def test_scanned_stack_shards_after_the_layer_axis():
    model = nnx.eval_shape(lambda: Transformer(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0)))
    specs = check_rules(nnx.state(model, nnx.Param), make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert specs["layers/self_attn/q_proj/weight"] == P(None, "tensor", "fsdp")
    assert specs["layers/input_layernorm/weight"] == P(None, "fsdp")
