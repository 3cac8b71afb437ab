"""How a run is assembled, once for both uses: `assemble` takes the recipe's model (real, or abstract from
`nnx.eval_shape`) and a mesh, and returns the placed partitions, optimizer state and jitted steps.
`jaxtune train` runs them (`train/loop.py`); `jaxtune train --dry-run` lowers and compiles the same train
step on abstract weights (`lower_train_step`), so shapes that do not divide, invalid shardings and compile
errors surface before any weight is read, and XLA's memory analysis gives a per-device estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxtune.model.config import ModelConfig, parse_dtype
from jaxtune.model.sharding import MESH_AXES, batch_spec, check_rules, make_mesh, tree_shardings
from jaxtune.model.transformer import Transformer
from jaxtune.recipe import ConfigError, RecipeConfig
from jaxtune.train.vocab import TokenRows


def build_mesh(cfg: RecipeConfig, devices=None) -> jax.sharding.Mesh:
    """The recipe's mesh. Explicit sizes smaller than this host's device count (no `-1`) use the first
    devices, e.g. `mesh: {data: 1}` to debug on one GPU of eight; multi-process jobs must use them all."""
    devices = list(devices if devices is not None else jax.devices())
    if -1 not in cfg.mesh.values() and jax.process_count() == 1:
        devices = devices[:int(np.prod(list(cfg.mesh.values()) or [1]))]
    mesh = make_mesh(cfg.mesh, devices)
    if cfg.model.attention_impl == "cpu_flash" and mesh.size > 1:
        # XLA partitions a custom call only by replicating it: every device would compute the whole batch.
        raise ConfigError(f"model.attention_impl: cpu_flash runs on one device, this mesh has {mesh.size}; "
                          "use auto or blockwise, or mesh: {data: 1}")
    return mesh


def micro_rows(cfg: RecipeConfig, mesh) -> int:
    """Rows per micro-batch; must split evenly over data×fsdp×expert."""
    k = cfg.optim.grad_accum_steps
    rows = cfg.train.batch_size // k
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if rows % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / optim.grad_accum_steps={k} = {rows} rows per "
                          f"micro-batch do not split over mesh data×fsdp×expert = {shards} devices; use a multiple of "
                          f"{shards * k}")
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must divide over {jax.process_count()} hosts")
    return rows


@dataclasses.dataclass
class Parts:
    """What stays fixed through a run: the model's structure and frozen partition, the optimizer, the
    jitted steps. The trainable partition and optimizer state, which change, are returned beside it."""

    graphdef: Any
    frozen: Any
    token_rows: TokenRows | None
    tx: Any
    schedule: Callable
    train_step: Any  # jit_train_step: (graphdef, trainable, frozen, opt_state, batch, rng)
    eval_step: Any  # jit_eval_step: (graphdef, trainable, frozen, batch)
    param_specs: dict[str, jax.sharding.PartitionSpec]


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _with_sharding(tree, shardings):
    """Abstract leaves carrying their placement (`shardings` is a prefix tree: one per Variable)."""
    def one(s, x):
        if isinstance(x, nnx.Variable):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _place(tree, shardings):
    """Arrays go to their devices; abstract leaves only take the placement a compile reads."""
    return _with_sharding(tree, shardings) if _is_abstract(tree) else jax.device_put(tree, shardings)


def assemble(cfg: RecipeConfig, model, token_ids, mesh, total_steps: int):
    """`(parts, trainable, opt_state)` for `model` on `mesh`, all placed by the sharding rules.

    The optimizer state is created with the shardings the step pins its outputs to, so every call sees the
    same input layouts and the train step compiles once (created without them, the second call compiles it
    again)."""
    from jaxtune.train.optim import lr_schedule, make_optimizer
    from jaxtune.train.partition import split_trainable, trainable_filter
    from jaxtune.train.step import jit_eval_step, jit_train_step
    from jaxtune.train.vocab import split_model

    specs = check_rules(nnx.state(model, nnx.Param), mesh)
    filt = trainable_filter(cfg.train.mode, cfg.train.freeze)
    split_trainable(model, filt)
    graphdef, trainable, frozen, token_rows = split_model(model, filt, token_ids)
    trainable_sh = tree_shardings(trainable, mesh)
    trainable, frozen = _place(trainable, trainable_sh), _place(frozen, tree_shardings(frozen, mesh))
    tx = make_optimizer(cfg.optim, total_steps, trainable)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt_sh = tree_shardings(opt_abstract, mesh)
    if _is_abstract(trainable):
        opt_state = _with_sharding(opt_abstract, opt_sh)
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    chunk = cfg.train.loss_chunk
    parts = Parts(graphdef=graphdef, frozen=frozen, token_rows=token_rows, tx=tx,
                  schedule=lr_schedule(cfg.optim, total_steps),
                  train_step=jit_train_step(tx, mesh=mesh, trainable_shardings=trainable_sh, opt_shardings=opt_sh,
                                            loss_chunk=chunk, token_rows=token_rows),
                  eval_step=jit_eval_step(mesh=mesh, loss_chunk=chunk, token_rows=token_rows),
                  param_specs=specs)
    return parts, trainable, opt_state


# --- the dry run ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    n_params: int
    n_trainable: int
    batch_shape: tuple[int, ...]
    memory: dict[str, int]
    param_specs: dict[str, jax.sharding.PartitionSpec]
    # XLA's cost analysis of the compiled step, per device; a while loop's body (scanned layers, accumulated
    # micro-batches) is counted once, not once per trip.
    flops: float | None = None
    # (trainable, frozen, opt_state, batch, rng) as placed ShapeDtypeStructs: what the compiled step takes.
    abstract_args: tuple = ()


def runtime_config(cfg: RecipeConfig, model_cfg: ModelConfig) -> ModelConfig:
    m = cfg.model
    return model_cfg.replace(scan_layers=m.scan_layers, remat=m.remat, attention_impl=m.attention_impl)


def abstract_model(cfg: RecipeConfig, model_cfg: ModelConfig):
    """The recipe's model (LoRA applied) with ShapeDtypeStruct leaves: no memory, no weights."""
    from jaxtune.lora.apply import apply_lora
    from jaxtune.lora.quantize import quantize_base

    def build():
        model = Transformer(runtime_config(cfg, model_cfg), dtype=parse_dtype(cfg.model.dtype),
                            param_dtype=parse_dtype(cfg.param_dtype), rngs=nnx.Rngs(0))
        if cfg.lora is not None:
            quantize_base(model, cfg.lora)
            apply_lora(model, cfg.lora, nnx.Rngs(0))
        return model

    return nnx.eval_shape(build)


def abstract_batch(cfg: RecipeConfig, mesh) -> dict:
    """One optimizer step's batch as placed ShapeDtypeStructs (`[K, rows, T]` with accumulation)."""
    k = cfg.optim.grad_accum_steps
    rows = micro_rows(cfg, mesh)
    shape = (k, rows, cfg.data.seq_len) if k > 1 else (rows, cfg.data.seq_len)
    sharding = NamedSharding(mesh, batch_spec(len(shape), k > 1, mesh=mesh))
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
            for name in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}


def _memory(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    memory = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }
    memory["peak_estimate"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    return memory


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as `v5e:2x4` or `v5p:2x4x4` (chips per dimension), from libtpu's
    compile-only client: XLA:TPU compiles for them on a host without a TPU (`pip install 'jax[tpu]'`). A
    compile-only client holds no chip, so it does not take libtpu's one-process-per-host lock: it runs beside
    another libtpu process (a training run, a second compile)."""
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology {name}: compiling for a TPU without one needs libtpu "
                          "(pip install 'jax[tpu]', or jaxtune's [tpu-compile] extra)")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # read when libtpu first loads, below
    from jax.experimental import topologies

    chips = name.rpartition(":")[2].split("x")
    one_chip = {"chips_per_host_bounds": [1, 1, 1]} if all(c == "1" for c in chips) else {}  # libtpu's host: 2x2
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **one_chip).devices)
    except Exception as e:  # libtpu's own message names what it could not parse
        raise ConfigError(f"--topology {name}: libtpu cannot build this topology ({str(e).splitlines()[0]}); "
                          "expected a name like v5e:2x4 or v5p:2x2x2") from None


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def lower_train_step(cfg: RecipeConfig, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[Plan, object]:
    """Compile the recipe's train step for `mesh` on abstract inputs; returns the plan and the compiled
    executable (called as `compiled(*plan.abstract_args)` once those are real arrays). `mesh` may be made of
    another platform's devices (`topology_devices`): the step then compiles with that platform's compiler,
    attention picking that platform's kernel. Added tokens are
    modelled as rows of the existing vocabulary: shapes and shardings do not depend on which rows train.
    Without `train.steps` the schedule's length is a stand-in: it changes no shape."""
    from jaxtune.lora.apply import count_params

    model = abstract_model(cfg, model_cfg)
    token_ids = list(range(len(cfg.model.add_special_tokens)))
    parts, trainable, opt_state = assemble(cfg, model, token_ids, mesh, cfg.train.steps or 1000)
    batch = abstract_batch(cfg, mesh)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (trainable, parts.frozen, opt_state, batch, rng)
    # XLA:CPU computes in fp32 and would hoist every layer's converted weights out of the scanned loop; an
    # accelerator keeps them bf16. With the hoisting off, one layer's copy is live at a time, which is what an
    # accelerator's estimate should count (the executable is only for this estimate).
    cpu = mesh.devices.flat[0].platform == "cpu"
    options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if cpu else None
    compiled = parts.train_step.lower(parts.graphdef, *args).compile(compiler_options=options)
    plan = Plan(mesh=mesh, model_config=model.config, n_params=model.config.num_params(),
                n_trainable=count_params(trainable), batch_shape=batch["input_ids"].shape, memory=_memory(compiled),
                param_specs=parts.param_specs, abstract_args=args, flops=_flops(compiled))
    return plan, compiled


def format_plan(plan: Plan) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mesh = dict(zip(MESH_AXES, plan.mesh.devices.shape))
    device = plan.mesh.devices.flat[0]
    lines = [
        f"mesh            {mesh} on {device.platform} ({plan.mesh.size} × {device.device_kind})",
        f"parameters      {plan.n_params:,} ({plan.n_trainable:,} trainable)",
        f"batch           {plan.batch_shape} per optimizer step (global)",
    ]
    if plan.memory:
        lines.append("memory/device   " + ", ".join(f"{k} {gib(v)}" for k, v in plan.memory.items()))
        if device.platform == "cpu":
            lines.append("                (XLA:CPU's estimate: it keeps fp32 copies of bf16 weights an accelerator "
                         "does not)")
    if plan.flops:
        lines.append(f"flops/device    {plan.flops:.3e} as XLA counts them (a loop body once, not per layer or "
                     "micro-batch)")
    return "\n".join(lines)


def describe_plan(cfg: RecipeConfig, topology: str | None = None) -> str:
    """`--dry-run`: read only the model's config, compile on this host's devices (or, with `topology`, for
    that TPU slice through libtpu), report."""
    from jaxtune.hf.load import load_config

    devices = topology_devices(topology) if topology else None
    try:
        plan, _ = lower_train_step(cfg, load_config(cfg.model.path), build_mesh(cfg, devices))
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU (and XLA:GPU) refuse a program larger than the device
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(f"the train step does not fit the device: {str(e).splitlines()[0]}; shard the weights "
                          "over more devices (mesh fsdp/tensor), lower batch_size per device, or set model.remat: "
                          "full") from None
    return format_plan(plan)
