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
    if devices[0].platform == "tpu":  # chips ordered along the ICI links, so each axis's neighbours are wired
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
HEARTBEAT_TIMEOUT_ENV = "JAXTUNE_HEARTBEAT_TIMEOUT"
# Seconds without a heartbeat before the coordination service declares a process dead and ends the others.
# JAX's own default (100 s) leaves the survivors of a crash blocked in a collective for that long.
DEFAULT_HEARTBEAT_TIMEOUT = 10


def _env_int(env: dict, name: str, low: int) -> int | None:
    raw = env.get(name)
    if raw is None or not str(raw).strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer >= {low}")
    return value


def is_multiprocess_env(env: dict) -> bool:
    """True when `env` describes a multi-process job: a coordinator address, SLURM/Open MPI with more than
    one task, or a multi-host TPU slice (several worker hostnames)."""
    if any(env.get(k) for k in _DISTRIBUTED_ENV):
        return True
    if any((_env_int(env, k, 1) or 1) > 1 for k in _CLUSTER_SIZE_ENV):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def on_cloud_tpu_vm(env: dict) -> bool:
    """A Cloud TPU VM (libtpu installed, chips at /dev/accel* or /dev/vfio/N) where jax may use the TPU. Its
    environment names no other worker: `jax.distributed.initialize()` finds them from the VM's metadata server
    (one host: a job of one process)."""
    import glob
    import importlib.util

    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return False
    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or
                                                                   glob.glob("/dev/vfio/[0-9]*"))


def distributed_args(env: dict) -> dict:
    """Keyword arguments of `jax.distributed.initialize` for the job `env` describes. JAX reads only the
    coordinator address itself; JAX_NUM_PROCESSES and JAX_PROCESS_ID are read here, and where unset (None)
    JAX detects them on SLURM, Open MPI and TPU slices. The heartbeat timeout is JAXTUNE_HEARTBEAT_TIMEOUT
    seconds (default `DEFAULT_HEARTBEAT_TIMEOUT`)."""
    n = _env_int(env, "JAX_NUM_PROCESSES", 1)
    index = _env_int(env, "JAX_PROCESS_ID", 0)
    if n is not None and index is not None and index >= n:
        raise ValueError(f"JAX_PROCESS_ID={index} must be below JAX_NUM_PROCESSES={n} (processes count from 0)")
    return {"coordinator_address": next((env[k] for k in _DISTRIBUTED_ENV if env.get(k)), None),
            "num_processes": n, "process_id": index,
            "heartbeat_timeout_seconds": _env_int(env, HEARTBEAT_TIMEOUT_ENV, 1) or DEFAULT_HEARTBEAT_TIMEOUT}


def maybe_initialize_distributed(heartbeat_timeout: int | None = None) -> bool:
    """`jax.distributed.initialize` for multi-process jobs (`distributed_args`) and on Cloud TPU VMs; a no-op on
    one host elsewhere, so single-host runs need no flags. Call before touching `jax.devices()`.

    A process that dies (killed, out of memory) stops sending heartbeats; after `heartbeat_timeout` seconds
    (default: `distributed_args`) JAX's coordination service ends every other process with an error naming
    the task that died, instead of leaving them blocked in a collective. Cross-process computations on CPU
    go over gloo unless `jax_cpu_collectives_implementation` was chosen already (older JAX leaves it unset)."""
    import os

    env = dict(os.environ)
    if not (is_multiprocess_env(env) or on_cloud_tpu_vm(env)) or jax.distributed.is_initialized():
        return False
    args = distributed_args(env)
    if heartbeat_timeout is not None:
        args["heartbeat_timeout_seconds"] = heartbeat_timeout
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"multi-process start-up: {e} Set JAX_COORDINATOR_ADDRESS (host:port of process 0), "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process, unless SLURM, Open MPI or a TPU "
                         "slice provides them") from None
    return True
