"""Logical axis names → mesh axes. Parameters declare `axes=` once; placement comes only from these rules."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Each logical axis maps to a mesh axis (or None: replicated). Batch goes over data×fsdp.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "lora_rank": None,
}


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """Mesh over (`data`, `fsdp`, `tensor`); one `-1` entry takes the remaining devices. Axes are Auto so
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


def state_shardings(state: nnx.State, mesh: Mesh, rules: dict | None = None):
    """NamedSharding per leaf of an (abstract) NNX state, from each Variable's `axes` metadata."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules, mesh))
