"""LoRA by parameter partitioning: PEFT-layout adapters on our own Linear, trainable/frozen splits, merging.

Adapters are `nnx.LoRAParam` leaves (`lora_A` [r, in], `lora_B` [out, r], fp32) set on the targeted
`layers.Linear` modules, so `nnx.split(model, nnx.LoRAParam, ...)` separates them from the frozen base and
the optimizer never sees a base-sized tensor. Targets are matched against HF module names
(`model.layers.0.self_attn.q_proj`) with PEFT's own rules, so an adapter config means the same thing here
and in `peft`. The config that was applied is kept on the model (`model.lora_config`, static) so merge and
export know which modules carry real adapters.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.hf.families import family, nnx_to_hf
from jaxtune.lora.config import LoraConfig, LoraConfigError
from jaxtune.model.layers import Linear, merged_weight
from jaxtune.model.sharding import variable_sharding

Array = jax.Array


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
    linear = [_hf_module(model, path, i) for path, _, layers in _linear_sites(model)
              for i in ([None] if layers is None else range(layers))]
    names, other = set(linear), set()
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for i in ([None] if not model.config.scan_layers or path[0] != "layers" else
                  range(model.config.num_hidden_layers)):
            hf = _hf_param(model, path, i)
            if hf is None:
                continue
            parts = hf.split(".")[:-1]
            other.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return linear, sorted(other - names)


def _hf_param(model, path: tuple, layer: int | None) -> str | None:
    if "lora_A" in path or "lora_B" in path:
        return None
    return nnx_to_hf(model.config.model_type, path, layer)


def _hf_module(model, path: tuple, layer: int | None) -> str:
    return nnx_to_hf(model.config.model_type, (*path, "weight"), layer).removesuffix(".weight")


def _linear_sites(model) -> Iterator[tuple[tuple, Linear, int | None]]:
    """(NNX path, Linear, layer count if stacked) for every Linear in the model, lm_head included."""
    stacked = model.config.num_hidden_layers if model.config.scan_layers else None
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield tuple(path), node, (stacked if path and path[0] == "layers" else None)


def resolve_targets(cfg: LoraConfig, model) -> dict[str, tuple[int, float]]:
    """HF module name → (rank, alpha) for every module `cfg` adapts in `model`; refuses what PEFT would
    wrap but we cannot (lm_head, embeddings, non-linear modules) and targets that match nothing."""
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
        raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} selects {bad[0]!r}, which is not a "
                              f"linear layer; LoRA applies to {', '.join(linears)}")
    targets = _targets(cfg, linears)
    if not isinstance(targets, str) and cfg.target_modules != "all-linear":
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in linear):
                raise LoraConfigError(f"lora.target_modules entry {t!r} matches no linear layer of this "
                                      f"{model.config.model_type} model; use one of {', '.join(linears)}, "
                                      "'all-linear', a full module path or a regex string")
    if not plan:
        raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} (layers_to_transform="
                              f"{cfg.layers_to_transform}, exclude_modules={cfg.exclude_modules!r}) selects no "
                              "linear layer of this model")
    return plan


# ---------------------------------------------------------------------------------------------- apply


def _kaiming_a(key: Array, rank: int, fan_in: int) -> Array:
    """PEFT's `kaiming_uniform_(a=√5)` on lora_A: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (rank, fan_in), jnp.float32, -bound, bound)


def _lora_axes(weight: nnx.Variable) -> tuple[tuple, tuple]:
    axes = weight.get_metadata().get("axes") or (None,) * weight.ndim
    *lead, out_ax, in_ax = axes
    return (*lead, "lora_rank", in_ax), (*lead, out_ax, "lora_rank")


def _placed(value: Array, var: nnx.Variable, like: nnx.Variable, rules) -> Array:
    """Put a new adapter leaf on the base weight's mesh (if it is sharded) with its own logical axes."""
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
    a_axes, b_axes = _lora_axes(linear.weight)
    va, vb = nnx.LoRAParam(a, axes=a_axes), nnx.LoRAParam(b, axes=b_axes)
    va.set_value(_placed(a, va, linear.weight, rules))
    vb.set_value(_placed(b, vb, linear.weight, rules))
    linear.lora_A, linear.lora_B = nnx.data(va), nnx.data(vb)
    linear.lora_scale, linear.lora_dropout = float(scale), float(dropout)
    linear.lora_merged_forward = merge_is_cheaper(linear.in_features, linear.out_features, a.shape[-2])


def apply_lora(model, cfg: LoraConfig, rngs: nnx.Rngs | int = 0, *, rules: dict | None = None):
    """Add PEFT-initialised adapters (A kaiming-uniform, B zero, fp32) to the targeted linears, in place;
    returns `model`. In the scanned layout a module's adapters are stacked over layers: layers outside
    `layers_to_transform` get A = B = 0, which contributes nothing and receives zero gradient."""
    if getattr(model, "lora_config", None) is not None:
        raise LoraConfigError("the model already has LoRA adapters; merge_lora() it first or start from the base")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    plan = resolve_targets(cfg, model)
    for path, linear, layers in _linear_sites(model):
        names = [_hf_module(model, path, None)] if layers is None else [
            _hf_module(model, path, i) for i in range(layers)]
        chosen = [n for n in names if n in plan]
        if not chosen:
            continue
        specs = {plan[n] for n in chosen}
        if len(specs) > 1:
            raise LoraConfigError(f"rank/alpha patterns give {'/'.join(map(str, path))} different ranks or alphas "
                                  f"across layers ({sorted(specs)}); stacked (scan_layers) adapters need one "
                                  "rank and alpha per module: load the model with scan_layers=False")
        (rank, alpha), = specs
        fan_in, fan_out = linear.in_features, linear.out_features
        if layers is None:
            a = _kaiming_a(rngs.params(), rank, fan_in)
            b = jnp.zeros((fan_out, rank), jnp.float32)
        else:
            a = jnp.stack([_kaiming_a(rngs.params(), rank, fan_in) if n in plan else
                           jnp.zeros((rank, fan_in), jnp.float32) for n in names])
            b = jnp.zeros((layers, fan_out, rank), jnp.float32)
        _set_adapter(linear, a, b, cfg.scale(rank, alpha), cfg.dropout, rules)
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
        for i in ([None] if layers is None else range(layers)):
            name = _hf_module(model, path, i)
            if name in plan:
                yield name, linear, i


# ---------------------------------------------------------------------------------------------- merge


def merge_lora(model):
    """A new model with every adapter folded into its base weight and removed (the input is untouched)."""
    new = nnx.clone(model)
    for _, linear, _ in _linear_sites(new):
        if linear.lora_A is None:
            continue
        linear.weight.set_value(merged_weight(linear.weight[...], linear.lora_A[...], linear.lora_B[...],
                                              linear.lora_scale))
        linear.lora_A = linear.lora_B = None
        linear.lora_scale = linear.lora_dropout = 0.0
        linear.lora_merged_forward = False
    new.lora_config = None
    return new



def count_params(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))
