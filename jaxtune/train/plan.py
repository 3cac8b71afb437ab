"""Check a recipe before any weight exists: build the model abstractly (`nnx.eval_shape`), place it on a
mesh by the sharding rules, and lower + compile the real train step. Shapes that do not divide, invalid
shardings and compile errors surface here, and XLA's memory analysis gives a per-device estimate.

Used by `jaxtune train RECIPE --dry-run` and by the test that checks every recipe in `configs/`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jaxtune.recipe import RecipeConfig
from jaxtune.model.config import ModelConfig, parse_dtype
from jaxtune.model.sharding import MESH_AXES, batch_spec, check_rules, tree_shardings
from jaxtune.model.transformer import Transformer


@dataclasses.dataclass
class Plan:
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    n_params: int
    n_trainable: int
    batch_shape: tuple[int, ...]
    memory: dict[str, int]
    param_specs: dict[str, jax.sharding.PartitionSpec]
    # (trainable, frozen, opt_state, batch, rng) as placed ShapeDtypeStructs: what the compiled step takes.
    abstract_args: tuple = ()


def runtime_config(cfg: RecipeConfig, model_cfg: ModelConfig) -> ModelConfig:
    m = cfg.model
    return model_cfg.replace(scan_layers=m.scan_layers, remat=m.remat, attention_impl=m.attention_impl)


def _with_sharding(tree, shardings):
    """Abstract leaves carrying their placement (`shardings` is a prefix tree: one per Variable)."""
    def one(s, x):
        if isinstance(x, nnx.Variable):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: RecipeConfig, model_cfg: ModelConfig):
    """The recipe's model (LoRA applied) with ShapeDtypeStruct leaves: no memory, no weights."""
    from jaxtune.lora.apply import apply_lora

    def build():
        model = Transformer(runtime_config(cfg, model_cfg), dtype=parse_dtype(cfg.model.dtype),
                            param_dtype=parse_dtype(cfg.param_dtype), rngs=nnx.Rngs(0))
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, nnx.Rngs(0))
        return model

    return nnx.eval_shape(build)


def lower_train_step(cfg: RecipeConfig, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[Plan, object]:
    """Compile the recipe's train step for `mesh` on abstract inputs; returns the plan and the compiled
    executable (called as `compiled(*plan.abstract_args)` once those are real arrays). Added tokens are
    modelled as rows of the existing vocabulary: shapes and shardings do not depend on which rows train."""
    from jaxtune.lora.apply import count_params
    from jaxtune.train.partition import split_trainable, trainable_filter
    from jaxtune.train.loop import micro_rows
    from jaxtune.train.optim import make_optimizer
    from jaxtune.train.step import jit_train_step
    from jaxtune.train.vocab import split_model

    model = abstract_model(cfg, model_cfg)
    specs = check_rules(nnx.state(model, nnx.Param), mesh)
    filt = trainable_filter(cfg.train.mode, cfg.train.freeze)
    split_trainable(model, filt)
    token_ids = list(range(len(cfg.model.add_special_tokens)))
    graphdef, trainable, frozen, token_rows = split_model(model, filt, token_ids)
    tx = make_optimizer(cfg.optim, cfg.train.steps or 1000, trainable)
    trainable_sh = tree_shardings(trainable, mesh)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt_sh = tree_shardings(opt_abstract, mesh)
    k = cfg.optim.grad_accum_steps
    rows = micro_rows(cfg, mesh)
    shape = (k, rows, cfg.data.seq_len) if k > 1 else (rows, cfg.data.seq_len)
    batch_sh = NamedSharding(mesh, batch_spec(len(shape), k > 1, mesh=mesh))
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
             for name in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    step = jit_train_step(tx, mesh=mesh, trainable_shardings=trainable_sh, opt_shardings=opt_sh,
                          loss_chunk=cfg.train.loss_chunk, token_rows=token_rows)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (_with_sharding(trainable, trainable_sh), _with_sharding(frozen, tree_shardings(frozen, mesh)),
            _with_sharding(opt_abstract, opt_sh), batch, rng)
    compiled = step.lower(graphdef, *args).compile()
    mem = compiled.memory_analysis()
    memory = {} if mem is None else {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }
    if memory:
        memory["peak_estimate"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    plan = Plan(mesh=mesh, model_config=model.config, n_params=model.config.num_params(),
                n_trainable=count_params(trainable), batch_shape=shape, memory=memory,
                param_specs=specs, abstract_args=args)
    return plan, compiled


def format_plan(plan: Plan) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mesh = dict(zip(MESH_AXES, plan.mesh.devices.shape))
    lines = [
        f"mesh            {mesh} on {plan.mesh.devices.flat[0].platform} ({plan.mesh.size} devices)",
        f"parameters      {plan.n_params:,} ({plan.n_trainable:,} trainable)",
        f"batch           {plan.batch_shape} per optimizer step (global)",
    ]
    if plan.memory:
        lines.append("memory/device   " + ", ".join(f"{k} {gib(v)}" for k, v in plan.memory.items()))
    return "\n".join(lines)


def describe_plan(cfg: RecipeConfig) -> str:
    """`--dry-run`: read only the model's config, compile on this host's devices, report."""
    from jaxtune.hf.load import load_config
    from jaxtune.train.loop import build_mesh

    mesh = build_mesh(cfg)
    plan, _ = lower_train_step(cfg, load_config(cfg.model.path), mesh)
    return format_plan(plan)
