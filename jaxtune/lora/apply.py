"""LoRA by parameter partitioning: PEFT-layout adapters on our own Linear and MoE experts, trainable/frozen
splits, merging.

Adapters are `nnx.LoRAParam` leaves (`lora_A` [r, in], `lora_B` [out, r], fp32) set on the targeted
`layers.Linear` modules, or on `moe.Experts` for the expert tensors `target_parameters` names (PEFT's
`ParamWrapper` shapes, `<param>_lora_A` [r·E, in], `<param>_lora_B` [out, r·E]), so `nnx.split(model,
nnx.LoRAParam, ...)` separates them from the frozen base and the optimizer never sees a base-sized tensor.
Targets are matched against HF module names (`model.layers.0.self_attn.q_proj`) and parameter names
(`model.layers.0.mlp.experts.gate_up_proj`) with PEFT's own rules, so an adapter config means the same thing
here and in `peft`. The config that was applied is kept on the model (`model.lora_config`, static) so merge
and export know which modules carry real adapters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.hf.families import family, nnx_to_hf
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.model.layers import Linear, merged_weight
from jaxtune.model.moe import EXPERT_PARAMETERS, Experts, merged_expert_weight
from jaxtune.model.quant import is_companion, logical_shape, param_value, unquantize_param
from jaxtune.model.sharding import variable_sharding

Array = jax.Array

# The expert tensors `target_parameters` can adapt, in the order HF's experts modules register them: PEFT wraps
# each targeted tensor of a module in its own ParamWrapper, nested in this order, which fixes the adapter's keys.


# ---------------------------------------------------------------------------------------------- targets


def _pattern_value(patterns: tuple[tuple[str, Any], ...], name: str, default):
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index(cfg: LoraConfig, name: str) -> int | None:
    if not cfg.layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in cfg.layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _excluded(cfg: LoraConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return name in ex or any(name.endswith(f".{e}") for e in ex)


def linear_names(model) -> tuple[str, ...]:
    """The decoder's linear modules as PEFT names them, from the model's family: what "all-linear" means."""
    return family(model.config.model_type).linear_names


def _targets(cfg: LoraConfig, linears: tuple[str, ...]) -> str | tuple[str, ...]:
    return linears if cfg.target_modules == "all-linear" else cfg.target_modules


def _matches(cfg: LoraConfig, name: str, linears: tuple[str, ...]) -> bool:
    """PEFT's `check_target_module_exists`, without the parts we refuse (modules_to_save, target_parameters)."""
    if _excluded(cfg, name):
        return False
    targets = _targets(cfg, linears)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    if cfg.layers_to_transform is None:
        return True
    return _layer_index(cfg, name) in cfg.layers_to_transform


def module_names(model) -> tuple[list[str], list[str]]:
    """(HF names of every linear, lm_head included; HF names of every other module) of `model`, as PEFT
    names them, so targets resolve here exactly as `peft` resolves them on the HF model."""
    linear = [_hf_module(model, path, i) for path, _, layers in _linear_sites(model) for i in layers]
    names, other = set(linear), set()
    for hf, _ in _parameter_names(model):
        parts = hf.split(".")[:-1]
        other.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return linear, sorted(other - names)


def _layers_of(model, path: tuple) -> list[int | None]:
    """The layer indices an NNX path stands for, in stack order: its stack's layers (scanned), else [None]."""
    stack = model.config.layer_stacks.get(path[0]) if path else None
    return list(stack) if stack else [None]


def _expert_modules(model) -> Iterator[tuple[tuple, Experts]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Experts):
            yield tuple(path), node


def _expert_param_name(model, path: tuple, layer: int | None, param: str) -> str:
    """PEFT's name of an expert tensor: HF's in-memory module path, which NNX paths keep (the Hub names each
    expert's slice instead, e.g. Mixtral's `block_sparse_moe.experts.0.w1`), plus the parameter."""
    if layer is not None:
        path = ("layers", layer, *path[1:])
    return family(model.config.model_type).tensors.prefix + ".".join(map(str, (*path, param)))


def _parameter_names(model) -> Iterator[tuple[str, bool]]:
    """(HF name, whether it is an expert tensor) of every base parameter, per layer, as PEFT names them."""
    experts = {path for path, _ in _expert_modules(model)}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam) or is_companion(var):
            continue
        for i in _layers_of(model, path):
            if path[:-1] in experts:
                yield _expert_param_name(model, path[:-1], i, path[-1]), True
            else:
                yield nnx_to_hf(model.config.model_type, path, i), False


def _hf_module(model, path: tuple, layer: int | None) -> str:
    return nnx_to_hf(model.config.model_type, (*path, "weight"), layer).removesuffix(".weight")


def _linear_sites(model) -> Iterator[tuple[tuple, Linear, list[int | None]]]:
    """(NNX path, Linear, `_layers_of` it) for every Linear in the model, lm_head included."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield tuple(path), node, _layers_of(model, tuple(path))


def _short(name: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` → `mlp.experts.down_proj`: how a target list names it."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def _expert_hint(model) -> str:
    names = sorted({_short(n) for n, expert in _parameter_names(model) if expert}, key=lambda n: (
        EXPERT_PARAMETERS.index(n.rsplit(".", 1)[-1]), n))
    if not names:
        return f"this {model.config.model_type} model has no MoE experts, the only tensors target_parameters adapts"
    return f"this {model.config.model_type} model's expert tensors are {', '.join(names)}"


def resolve_targets(cfg: LoraConfig, model) -> dict[str, tuple[int, float]]:
    """HF name → (rank, alpha) for every linear module (`module_targets`) and expert tensor
    (`parameter_targets`) `cfg` adapts in `model`; refuses a config that adapts nothing."""
    plan = {**module_targets(cfg, model), **parameter_targets(cfg, model)}
    if not plan:
        raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} (layers_to_transform="
                              f"{cfg.layers_to_transform}, exclude_modules={cfg.exclude_modules!r}) selects no "
                              "linear layer of this model")
    return plan


def parameter_targets(cfg: LoraConfig, model) -> dict[str, tuple[int, float]]:
    """HF parameter name → (rank, alpha) for every expert tensor `cfg.target_parameters` names, matched as PEFT
    does (the whole name or a dotted suffix; layers_to_transform and exclude_modules do not apply). An entry
    that matches nothing, or a tensor that is not an expert tensor, is refused."""
    if not cfg.target_parameters:
        return {}
    names = list(_parameter_names(model))
    plan: dict[str, tuple[int, float]] = {}
    for target in cfg.target_parameters:
        hits = [(n, expert) for n, expert in names if n == target or n.endswith(f".{target}")]
        if not hits:
            raise LoraConfigError(f"lora.target_parameters entry {target!r} matches no parameter: "
                                  f"{_expert_hint(model)}")
        bad = next((n for n, expert in hits if not expert), None)
        if bad is not None:
            raise LoraConfigError(f"lora.target_parameters entry {target!r} selects {bad!r}, which is not an MoE "
                                  f"expert tensor ({_expert_hint(model)}); adapt linear layers with target_modules")
        for n, _ in hits:
            plan[n] = (_pattern_value(cfg.rank_pattern, n, cfg.rank), _pattern_value(cfg.alpha_pattern, n, cfg.alpha))
    return plan


def module_targets(cfg: LoraConfig, model) -> dict[str, tuple[int, float]]:
    """HF module name → (rank, alpha) for every linear `cfg.target_modules` adapts in `model`; refuses what
    PEFT would wrap but we cannot (lm_head, embeddings, non-linear modules) and entries that match nothing."""
    linear, other = module_names(model)
    linears = linear_names(model)
    plan: dict[str, tuple[int, float]] = {}
    for name in linear:
        if _matches(cfg, name, linears):
            if name == "lm_head":
                raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} selects lm_head; LoRA on the "
                                      "output head is not supported (target the decoder linears)")
            plan[name] = (_pattern_value(cfg.rank_pattern, name, cfg.rank),
                          _pattern_value(cfg.alpha_pattern, name, cfg.alpha))
    bad = [n for n in other if _matches(cfg, n, linears)]
    if bad:
        experts = {n.rsplit(".", 1)[0] for n, expert in _parameter_names(model) if expert}
        hint = f" (its tensors take lora.target_parameters: {_expert_hint(model)})" if bad[0] in experts else ""
        raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} selects {bad[0]!r}, which is not a "
                              f"linear layer{hint}; LoRA applies to {', '.join(linears)}")
    targets = _targets(cfg, linears)
    if not isinstance(targets, str) and cfg.target_modules != "all-linear":
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in linear):
                raise LoraConfigError(f"lora.target_modules entry {t!r} matches no linear layer of this "
                                      f"{model.config.model_type} model; use one of {', '.join(linears)}, "
                                      "'all-linear', a full module path or a regex string")
    return plan


# ---------------------------------------------------------------------------------------------- apply


def _kaiming_a(key: Array, rank: int, fan_in: int) -> Array:
    """PEFT's `kaiming_uniform_(a=√5)` on lora_A: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (rank, fan_in), jnp.float32, -bound, bound)


def _init_factors(rngs: nnx.Rngs, names: list[str], plan: dict, rows: int, fan_in: int, fan_out: int,
                  stacked: bool) -> tuple[Array, Array]:
    """PEFT's init for one adapted weight, `rows` = r (Linear) or r·E (experts): A kaiming-uniform, B zero; in a
    stack, layers outside `plan` get A = B = 0, which contributes nothing and receives zero gradient."""
    a = [_kaiming_a(rngs.params(), rows, fan_in) if n in plan else jnp.zeros((rows, fan_in), jnp.float32)
         for n in names]
    b = jnp.zeros((len(names), fan_out, rows), jnp.float32)
    return (jnp.stack(a), b) if stacked else (a[0], b[0])


def _one_spec(plan: dict, chosen: list[str], path: tuple) -> tuple[int, float]:
    specs = {plan[n] for n in chosen}
    if len(specs) > 1:
        raise LoraConfigError(f"rank/alpha patterns give {'/'.join(map(str, path))} different ranks or alphas "
                              f"across layers ({sorted(specs)}); stacked (scan_layers) adapters need one "
                              "rank and alpha per module: load the model with scan_layers=False")
    return next(iter(specs))


def _adapter_vars(weight: nnx.Variable, a: Array, b: Array, rules, experts: bool = False):
    """`nnx.LoRAParam`s for A and B with the weight's leading (layer) logical axes, placed on its mesh. An
    expert adapter's r·E axis takes the weight's expert axis: A's rows are expert-major, so its shards hold
    whole experts; B's columns are rank-major, so its shards are a split of the same size, not by expert."""
    axes = weight.get_metadata().get("axes") or (None,) * weight.ndim
    *lead, out_ax, in_ax = axes
    rank_ax = lead.pop() if experts else "lora_rank"
    va = nnx.LoRAParam(a, axes=(*lead, rank_ax, in_ax))
    vb = nnx.LoRAParam(b, axes=(*lead, out_ax, rank_ax))
    va.set_value(_placed(a, va, weight, rules))
    vb.set_value(_placed(b, vb, weight, rules))
    return nnx.data(va), nnx.data(vb)


def _placed(value: Array, var: nnx.Variable, like: nnx.Variable, rules) -> Array:
    """Put a new leaf (an adapter, a quantized weight's part) on its base weight's mesh, if that is sharded, by
    its own logical axes."""
    base = like[...]
    sharding = getattr(base, "sharding", None) if isinstance(base, jax.Array) and not isinstance(
        base, jax.core.Tracer) else None
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(value, variable_sharding(var, sharding.mesh, rules))
    return value


# Merge an adapter into its weight on the fly when in·out ≤ MERGE_RATIO·r·(in + out) (see merge_is_cheaper).
MERGE_RATIO = 8


def merge_is_cheaper(in_features: int, out_features: int, rank: int) -> bool:
    """Whether `x (W + s·B·A)ᵀ` beats `x Wᵀ + s·(x Aᵀ) Bᵀ` for a LoRA layer (`Linear.lora_merged_forward`).

    Per token the merged form costs 3·in·out FLOP-units (forward, input gradient, weight gradient) against
    2·in·out + 3·r·(in + out) for the factored one, and its three matmuls have full-width contractions where
    the factored one has rank-r contractions, which run far below peak on CPUs. Only tiny layers qualify
    (docs/benchmarks.md has the measurements behind the ratio)."""
    return in_features * out_features <= MERGE_RATIO * rank * (in_features + out_features)


def _set_adapter(linear: Linear, a: Array, b: Array, scale: float, dropout: float, rules) -> None:
    linear.lora_A, linear.lora_B = _adapter_vars(linear.weight, a, b, rules)
    linear.lora_scale, linear.lora_dropout = float(scale), float(dropout)
    linear.lora_merged_forward = merge_is_cheaper(linear.in_features, linear.out_features, a.shape[-2])


def _set_expert_adapter(experts: Experts, param: str, a: Array, b: Array, scale: float, rules) -> None:
    va, vb = _adapter_vars(getattr(experts, param), a, b, rules, experts=True)
    setattr(experts, f"{param}_lora_A", va)
    setattr(experts, f"{param}_lora_B", vb)
    setattr(experts, f"{param}_lora_scale", float(scale))


def apply_lora(model, cfg: LoraConfig, rngs: nnx.Rngs | int = 0, *, rules: dict | None = None):
    """Add PEFT-initialised adapters (A kaiming-uniform, B zero, fp32) to the targeted linears and expert
    tensors, in place; returns `model`. In the scanned layout a module's adapters are stacked over layers:
    layers not targeted get A = B = 0, which contributes nothing and receives zero gradient."""
    if getattr(model, "lora_config", None) is not None:
        raise LoraConfigError("the model already has LoRA adapters; merge_lora() it first or start from the base")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    plan = resolve_targets(cfg, model)
    for path, linear, layers in _linear_sites(model):
        names = [_hf_module(model, path, i) for i in layers]
        chosen = [n for n in names if n in plan]
        if not chosen:
            continue
        rank, alpha = _one_spec(plan, chosen, path)
        a, b = _init_factors(rngs, names, plan, rank, linear.in_features, linear.out_features, layers != [None])
        _set_adapter(linear, a, b, cfg.scale(rank, alpha), cfg.dropout, rules)
    for path, experts in _expert_modules(model):
        layers = _layers_of(model, path)
        for param in EXPERT_PARAMETERS:
            names = [_expert_param_name(model, path, i, param) for i in layers]
            chosen = [n for n in names if n in plan]
            if not chosen:
                continue
            rank, alpha = _one_spec(plan, chosen, (*path, param))
            num_experts, fan_out, fan_in = logical_shape(experts, param)[-3:]
            a, b = _init_factors(rngs, names, plan, rank * num_experts, fan_in, fan_out, layers != [None])
            _set_expert_adapter(experts, param, a, b, cfg.scale(rank, alpha), rules)
    model.lora_config = cfg
    return model


def lora_sites(model) -> Iterator[tuple[str, Linear, int | None]]:
    """(HF module name, Linear, layer index in the stack or None) for every real adapter of `model`."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        return
    plan = resolve_targets(cfg, model)
    for path, linear, layers in _linear_sites(model):
        if linear.lora_A is None:
            continue
        for j, i in enumerate(layers):
            name = _hf_module(model, path, i)
            if name in plan:
                yield name, linear, None if i is None else j


def expert_lora_sites(model) -> Iterator[tuple[str, Experts, str, int | None]]:
    """(HF parameter name, Experts module, parameter, layer index in the stack or None) for every real expert
    adapter of `model`, parameters of one module in `EXPERT_PARAMETERS` order."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not cfg.target_parameters:
        return
    plan = parameter_targets(cfg, model)
    for path, experts in _expert_modules(model):
        for j, i in enumerate(_layers_of(model, path)):
            for param in EXPERT_PARAMETERS:
                name = _expert_param_name(model, path, i, param)
                if getattr(experts, f"{param}_lora_A") is not None and name in plan:
                    yield name, experts, param, None if i is None else j


# ---------------------------------------------------------------------------------------------- merge


def _float_dtype(module, name: str = "weight"):
    """The merged weight's dtype: the base's own, or fp32 where the base is stored quantized."""
    return jnp.float32 if getattr(module, f"{name}_quant") is not None else getattr(module, name).dtype


def _set_merged(module, name: str, value) -> None:
    if getattr(module, f"{name}_quant") is not None:
        unquantize_param(module, name, value)
    else:
        getattr(module, name).set_value(value)


def merge_lora(model):
    """A new model with every adapter folded into its base weight and removed (the input is untouched); a
    quantized base weight becomes the fp32 dequantized weight plus the adapter."""
    new = nnx.clone(model)
    for _, linear, _ in _linear_sites(new):
        if linear.lora_A is None:
            continue
        _set_merged(linear, "weight", merged_weight(param_value(linear, "weight", jnp.float32), linear.lora_A[...],
                                                    linear.lora_B[...], linear.lora_scale, _float_dtype(linear)))
        linear.lora_A = linear.lora_B = None
        linear.lora_scale = linear.lora_dropout = 0.0
        linear.lora_merged_forward = False
    for _, experts in _expert_modules(new):
        for param in EXPERT_PARAMETERS:
            lora_a = getattr(experts, f"{param}_lora_A")
            if lora_a is None:
                continue
            _set_merged(experts, param, merged_expert_weight(
                param_value(experts, param, jnp.float32), lora_a[...], getattr(experts, f"{param}_lora_B")[...],
                getattr(experts, f"{param}_lora_scale"), _float_dtype(experts, param)))
            setattr(experts, f"{param}_lora_A", None)
            setattr(experts, f"{param}_lora_B", None)
            setattr(experts, f"{param}_lora_scale", 0.0)
    new.lora_config = None
    return new



def count_params(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))
