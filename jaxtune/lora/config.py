"""`LoraConfig`: which modules and parameters get adapters, with what rank, alpha and dropout (PEFT's meaning)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtune.model.quant import BLOCKSIZES, QuantSpec
from jaxtune.model.quant import KINDS as QUANT_KINDS

QUANTIZE_SCOPES = ("targets", "all-linear", "all")


class LoraConfigError(ValueError):
    """A LoRA configuration (recipe section or PEFT adapter_config.json) that cannot be applied as written."""


def _as_names(value, field: str, allow_empty: bool = False) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and (value or allow_empty) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise LoraConfigError(f"lora.{field}: expected a module name, a list of names or a regex string, got {value!r}")


def _as_parameters(value) -> tuple[str, ...] | None:
    if value is None or (isinstance(value, Sequence) and not isinstance(value, str) and not value):
        return None
    if isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise LoraConfigError(f"lora.target_parameters: expected a list of parameter names such as "
                          f"['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'], got {value!r}")


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
    layer indices.

    `target_parameters`: MoE expert tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, or full names
    such as `model.layers.0.mlp.experts.down_proj`), matched on the full parameter name or a dotted suffix of it;
    as in PEFT, `layers_to_transform` and `exclude_modules` do not apply to them, they take no dropout, and
    `target_modules: []` adapts the experts alone (the default "all-linear" adds the decoder linears).

    `quantize` (QLoRA): store the frozen base `int8` (per output channel) or `nf4` (blocks of `quant_blocksize`,
    scales double-quantized unless `double_quant: false`), dequantized in the step before each matmul.
    `quantize_scope`: `targets` (the adapted linears and expert tensors), `all-linear` (every decoder linear and
    expert tensor), `all` (also the embedding and an untied lm_head). Not written to adapter_config.json: the
    adapter is the same PEFT adapter, trained against the quantized base."""

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
    target_parameters: tuple[str, ...] | None = None
    quantize: str | None = None
    quantize_scope: str = "targets"
    quant_blocksize: int = 64
    double_quant: bool = True

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
        set_("target_parameters", _as_parameters(self.target_parameters))
        set_("target_modules", _as_names(self.target_modules, "target_modules", allow_empty=True))
        if self.target_modules == () and not self.target_parameters:
            raise LoraConfigError("lora.target_modules is empty and lora.target_parameters is not set: nothing would "
                                  "be adapted; name the modules (or 'all-linear') or the expert parameters to adapt")
        if self.target_parameters and self.dropout:
            raise LoraConfigError(f"lora.dropout={self.dropout} with lora.target_parameters: an adapter on a parameter "
                                  "has no dropout (the input cannot be factored out of W + B·A; PEFT refuses it "
                                  "too); set lora.dropout: 0")
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
        if self.quantize is not None and self.quantize not in QUANT_KINDS:
            raise LoraConfigError(f"lora.quantize must be one of {', '.join(QUANT_KINDS)} or null, got "
                                  f"{self.quantize!r}")
        if self.quantize_scope not in QUANTIZE_SCOPES:
            raise LoraConfigError(f"lora.quantize_scope must be one of {', '.join(QUANTIZE_SCOPES)}, got "
                                  f"{self.quantize_scope!r}")
        if self.quant_blocksize not in BLOCKSIZES:
            raise LoraConfigError(f"lora.quant_blocksize must be one of {BLOCKSIZES}, got {self.quant_blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise LoraConfigError(f"lora.double_quant must be true or false, got {self.double_quant!r}")

    def quant_spec(self) -> QuantSpec | None:
        """How the frozen base is stored, or None for a float base."""
        if self.quantize is None:
            return None
        return QuantSpec(self.quantize, blocksize=self.quant_blocksize, double_quant=self.double_quant)

    def scale(self, rank: int, alpha: float) -> float:
        """PEFT's scaling: alpha/rank, or alpha/√rank with rsLoRA."""
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


