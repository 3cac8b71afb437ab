"""LoRA by parameter partitioning: PEFT-layout adapters on our own Linear, trainable/frozen splits, merging.

Adapters are `nnx.LoRAParam` leaves (`lora_A` [r, in], `lora_B` [out, r], fp32) set on the targeted
`layers.Linear` modules, so `nnx.split(model, nnx.LoRAParam, ...)` separates them from the frozen base and
the optimizer never sees a base-sized tensor. Targets are matched against HF module names
(`model.layers.0.self_attn.q_proj`) with PEFT's own rules, so an adapter config means the same thing here
and in `peft`. The config that was applied is kept on the model (`model.lora_config`, static) so merge and
export know which modules carry real adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.convert.mapping import nnx_to_hf
from jaxtune.model.layers import Linear, merged_weight
from jaxtune.model.sharding import variable_sharding

Array = jax.Array

# Linear modules of one decoder layer, as PEFT names them; "all-linear" means these (never lm_head).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfigError(ValueError):
    """A LoRA configuration (recipe section or PEFT adapter_config.json) that cannot be applied as written."""


def _as_names(value, field: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise LoraConfigError(f"lora.{field}: expected a module name, a list of names or a regex string, got {value!r}")


def _as_pattern(value, field: str, kind) -> tuple[tuple[str, Any], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        out = tuple((str(k), kind(v)) for k, v in items)
    except (TypeError, ValueError) as e:
        raise LoraConfigError(f"lora.{field}: expected a mapping of module pattern → {kind.__name__}: {e}") from e
    return out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Section `lora:` of a recipe; the optional fields mirror PEFT's so adapters round-trip.

    `target_modules`: names (`q_proj`, a full path such as `model.layers.0.mlp.up_proj`), `"all-linear"`, or a
    regex string matched against the full module name. `rank_pattern`/`alpha_pattern` map a module pattern
    to its own rank/alpha (first match wins, as in PEFT); `layers_to_transform` limits list targets to those
    layer indices."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    rslora: bool = False
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise LoraConfigError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        set_("alpha", float(self.alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        set_("dropout", float(self.dropout))
        set_("target_modules", _as_names(self.target_modules, "target_modules"))
        if self.exclude_modules is not None:
            set_("exclude_modules", _as_names(self.exclude_modules, "exclude_modules"))
        if self.layers_to_transform is not None:
            layers = (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else tuple(
                self.layers_to_transform)
            if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise LoraConfigError(f"lora.layers_to_transform must list layer indices, got {layers!r}")
            set_("layers_to_transform", layers)
        if self.layers_pattern is not None:
            pats = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else tuple(self.layers_pattern)
            set_("layers_pattern", pats or None)
        set_("rank_pattern", _as_pattern(self.rank_pattern, "rank_pattern", int))
        set_("alpha_pattern", _as_pattern(self.alpha_pattern, "alpha_pattern", float))
        if any(r < 1 for _, r in self.rank_pattern):
            raise LoraConfigError(f"lora.rank_pattern ranks must be positive, got {dict(self.rank_pattern)}")

    def scale(self, rank: int, alpha: float) -> float:
        """PEFT's scaling: alpha/rank, or alpha/√rank with rsLoRA."""
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


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


def _targets(cfg: LoraConfig) -> str | tuple[str, ...]:
    return LINEAR_NAMES if cfg.target_modules == "all-linear" else cfg.target_modules


def _matches(cfg: LoraConfig, name: str) -> bool:
    """PEFT's `check_target_module_exists`, without the parts we refuse (modules_to_save, target_parameters)."""
    if _excluded(cfg, name):
        return False
    targets = _targets(cfg)
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
    plan: dict[str, tuple[int, float]] = {}
    for name in linear:
        if _matches(cfg, name):
            if name == "lm_head":
                raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} selects lm_head; LoRA on the "
                                      "output head is not supported (target the decoder linears)")
            plan[name] = (_pattern_value(cfg.rank_pattern, name, cfg.rank),
                          _pattern_value(cfg.alpha_pattern, name, cfg.alpha))
    bad = [n for n in other if _matches(cfg, n)]
    if bad:
        raise LoraConfigError(f"lora.target_modules={cfg.target_modules!r} selects {bad[0]!r}, which is not a "
                              f"linear layer; LoRA applies to {', '.join(LINEAR_NAMES)}")
    targets = _targets(cfg)
    if not isinstance(targets, str) and cfg.target_modules != "all-linear":
        for t in targets:
            if not any(n == t or n.endswith(f".{t}") for n in linear):
                raise LoraConfigError(f"lora.target_modules entry {t!r} matches no linear layer of this "
                                      f"{model.config.model_type} model; use one of {', '.join(LINEAR_NAMES)}, "
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


def _set_adapter(linear: Linear, a: Array, b: Array, scale: float, dropout: float, rules) -> None:
    a_axes, b_axes = _lora_axes(linear.weight)
    va, vb = nnx.LoRAParam(a, axes=a_axes), nnx.LoRAParam(b, axes=b_axes)
    va.set_value(_placed(a, va, linear.weight, rules))
    vb.set_value(_placed(b, vb, linear.weight, rules))
    linear.lora_A, linear.lora_B = nnx.data(va), nnx.data(vb)
    linear.lora_scale, linear.lora_dropout = float(scale), float(dropout)


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
    new.lora_config = None
    return new


# ---------------------------------------------------------------------------------------------- partition


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
    """An NNX filter selecting what the optimizer updates: LoRA leaves, or every Param minus `freeze`.

    A `freeze` entry names a dotted sub-path of the NNX tree (`embed_tokens`, `lm_head`, `layers.0`,
    `self_attn.q_proj`, `norm`), matched on whole components."""

    mode: str = "lora"
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"train.mode={self.mode!r}: expected 'lora' or 'full'")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if self.freeze and self.mode == "lora":
            raise ValueError("train.freeze applies to mode 'full' only (in LoRA mode the base is frozen already)")

    def frozen_by(self, path: tuple) -> str | None:
        dotted = ".".join(str(p) for p in path)
        for entry in self.freeze:
            if re.search(rf"(^|\.){re.escape(entry)}(\.|$)", dotted):
                return entry
        return None

    def __call__(self, path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        if self.mode == "lora":
            return isinstance(value, nnx.LoRAParam)
        return self.frozen_by(path) is None


def trainable_filter(mode: str = "lora", freeze: Sequence[str] = ()) -> TrainableFilter:
    return TrainableFilter(mode, tuple(freeze))


def split_trainable(model, filt: TrainableFilter):
    """`(graphdef, trainable, frozen)`: the optimizer gets `trainable` only; `nnx.merge(graphdef, trainable,
    frozen)` rebuilds the model. Refuses an empty trainable set and freeze entries that match nothing."""
    graphdef, trainable, frozen = nnx.split(model, filt, ...)
    if filt.mode == "full":
        paths = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        unused = [e for e in filt.freeze if not any(filt.frozen_by(p) == e for p in paths)]
        if unused:
            raise ValueError(f"train.freeze entry {unused[0]!r} matches no parameter; use a dotted sub-path of the "
                             "model tree such as 'embed_tokens', 'lm_head', 'layers.0' or 'self_attn.q_proj'")
    if not jax.tree.leaves(trainable):
        hint = "call apply_lora() (set a lora: section)" if filt.mode == "lora" else "shorten train.freeze"
        raise ValueError(f"no trainable parameters in mode {filt.mode!r}: {hint}")
    return graphdef, trainable, frozen


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params):
    """Pytree of bools, True where weight decay applies: matrices only, never norms, biases or embeddings
    (LoRA A/B and untied lm_head decay). Works on any pytree whose key paths carry the NNX names."""

    def decays(path, leaf) -> bool:
        names = [_key_name(k) for k in path]
        if any("norm" in n or n in ("bias", "embed_tokens") for n in names):
            return False
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def count_params(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))


# ---------------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts and training memory (bytes; activations excluded) for LoRA vs full fine-tuning."""

    base_params: int
    lora_params: int
    lora_modules: int
    lora_memory: dict[str, int]
    full_memory: dict[str, int]

    @property
    def lora_fraction(self) -> float:
        """Trainable share as PEFT's `print_trainable_parameters` computes it (adapters counted in the total)."""
        return self.lora_params / (self.base_params + self.lora_params)


def _nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _memory(trainable, frozen, opt) -> dict[str, int]:
    weights = _nbytes(trainable) + _nbytes(frozen)
    grads = _nbytes(trainable)
    state = _nbytes(jax.eval_shape(opt.init, trainable))
    return {"weights": weights, "grads": grads, "optimizer": state, "total": weights + grads + state}


def param_report(model_config, cfg: LoraConfig, dtype=jnp.bfloat16, optim=None) -> ParamReport:
    """Counts and memory from abstract shapes only (no weights are read or allocated): base weights in
    `dtype`, LoRA in fp32, gradients in each trainable leaf's dtype, optimizer state exactly as
    `train.optim.make_optimizer(optim)` would allocate it (default AdamW)."""
    from jaxtune.model.transformer import Transformer
    from jaxtune.train.optim import OptimConfig, make_optimizer

    model_config = model_config.replace(scan_layers=False)
    opt = make_optimizer(optim or OptimConfig(), total_steps=1)
    base = nnx.eval_shape(lambda: Transformer(model_config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    adapted = nnx.eval_shape(lambda: apply_lora(
        Transformer(model_config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)), cfg, nnx.Rngs(0)))
    _, lora_t, lora_f = split_trainable(adapted, trainable_filter("lora"))
    _, full_t, full_f = split_trainable(base, trainable_filter("full"))
    return ParamReport(base_params=count_params(nnx.state(base, nnx.Param)), lora_params=count_params(lora_t),
                       lora_modules=len(resolve_targets(cfg, base)), lora_memory=_memory(lora_t, lora_f, opt),
                       full_memory=_memory(full_t, full_f, opt))
