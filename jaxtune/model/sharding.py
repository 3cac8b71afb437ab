"""Logical axis names → mesh axes. Parameters declare `axes=` once; placement comes only from these rules."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Each logical axis maps to a mesh axis (or None: replicated). Batch goes over data×fsdp×expert: expert
# parallelism splits the experts of an MoE layer over `expert` and the examples of every other layer.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "lora_rank": None,
    "expert": "expert",
}


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """Mesh over (`data`, `fsdp`, `expert`, `tensor`); one `-1` entry takes the remaining devices. Axes are Auto so
    tensor-parallel matmuls don't need explicit-sharding annotations."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; expected any of {MESH_AXES}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], rules: dict | None = None, mesh: Mesh | None = None,
                    shape: tuple[int, ...] | None = None) -> P:
    """PartitionSpec for one tensor. Refuses two logical axes on one mesh axis; a dim the mesh axis does
    not divide stays replicated (e.g. 4 kv heads on tensor=8) rather than failing at placement."""
    rules = DEFAULT_RULES if rules is None else rules
    used: dict[str, str] = {}
    spec = []
    for dim, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
            if shape is not None and targets:
                size = int(np.prod([mesh.shape[t] for t in targets]))
                if shape[dim] % size:
                    targets = ()
        for t in targets:
            if t in used:
                raise ValueError(f"logical axes {used[t]!r} and {name!r} of one tensor both map to mesh axis {t!r}")
            used[t] = name
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    axes = var.get_metadata().get("axes") or (None,) * var.ndim
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, tuple(var.shape)))


def batch_spec(ndim: int = 2, accum: bool = False, rules: dict | None = None, mesh: Mesh | None = None) -> P:
    """Spec for a `[B, T]` batch (or `[K, B, T]` gradient-accumulation batch): examples over data×fsdp×expert."""
    axes = (None, "batch") if accum else ("batch",)
    return logical_to_spec((*axes, *(None,) * (ndim - len(axes))), rules, mesh)


def shard_batch(batch: dict, mesh: Mesh, accum: bool = False, rules: dict | None = None) -> dict:
    """Host numpy batch → global arrays sharded over data×fsdp×expert. Each process passes its local rows, so the
    same call serves one CPU and a multi-host slice."""
    out = {}
    for name, arr in batch.items():
        arr = np.asarray(arr)
        sharding = NamedSharding(mesh, batch_spec(arr.ndim, accum, rules, mesh))
        out[name] = jax.make_array_from_process_local_data(sharding, arr)
    return out


def activation_spec(ndim: int = 3, rules: dict | None = None, mesh: Mesh | None = None) -> P:
    """`[B, T, …]` activations: batch over data×fsdp×expert, the rest left to the compiler."""
    return logical_to_spec(("batch", *(None,) * (ndim - 1)), rules, mesh)


def constrain_activations(x: jax.Array, mesh: Mesh | None, rules: dict | None = None) -> jax.Array:
    """Pin activations to the batch layout inside jit, so GSPMD does not guess a different one."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.ndim, rules, mesh)))


def tree_shardings(tree, mesh: Mesh, rules: dict | None = None):
    """Sharding per leaf of any tree that mixes Variables (placed by their `axes`) and plain arrays
    (replicated): parameter states and optimizer states alike. Usable as jit in/out shardings."""
    replicated = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, nnx.Variable):
            return variable_sharding(x, mesh, rules)
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_rules(state: nnx.State, mesh: Mesh, rules: dict | None = None) -> dict[str, P]:
    """Resolve every parameter's spec up front, naming the parameter whose axes break a rule."""
    specs = {}
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        axes = var.get_metadata().get("axes") or (None,) * var.ndim
        if len(axes) != var.ndim:
            raise ValueError(f"parameter {name}: axes {axes} do not match its shape {tuple(var.shape)}")
        try:
            specs[name] = logical_to_spec(axes, rules, mesh, tuple(var.shape))
        except (KeyError, ValueError) as e:
            raise ValueError(f"parameter {name}: {e}") from None
    return specs


_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def is_multiprocess_env(env: dict) -> bool:
    """True when `env` describes a multi-process job: a coordinator address, SLURM/Open MPI with more than
    one task, or a multi-host TPU slice (several worker hostnames)."""
    if any(env.get(k) for k in _DISTRIBUTED_ENV):
        return True
    if any(int(env.get(k) or 1) > 1 for k in _CLUSTER_SIZE_ENV):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` (which reads the cluster from the environment) for multi-process
    jobs; a no-op on one host, so single-host runs need no flags. Call before touching `jax.devices()`."""
    import os

    if not is_multiprocess_env(dict(os.environ)) or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize()
    return True
