"""What the optimizer updates: the trainable/frozen split (LoRA leaves, or full with frozen sub-paths), and
the parameter/memory report for LoRA vs full fine-tuning."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.lora.apply import apply_lora, count_params, resolve_targets
from jaxtune.lora.config import LoraConfig


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



# ---------------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts and training memory (bytes; activations excluded) for LoRA vs full fine-tuning."""

    base_params: int
    lora_params: int
    lora_modules: int
    lora_memory: dict[str, int]
    full_memory: dict[str, int]
    qlora_memory: dict[str, int] | None = None  # the same LoRA with the base stored as `LoraConfig.quantize` asks

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
    `train.optim.make_optimizer(optim)` would allocate it (default AdamW). With `cfg.quantize` the LoRA row is
    the unquantized base and `qlora_memory` the base as `quantize_base` stores it (codes and scales: the bytes
    `model.quant.quantized_nbytes` gives per weight). Parameters are counted as logical elements either way."""
    from jaxtune.lora.quantize import quantize_base
    from jaxtune.model.transformer import Transformer
    from jaxtune.train.optim import OptimConfig, make_optimizer

    model_config = model_config.replace(scan_layers=False)
    opt = make_optimizer(optim or OptimConfig(), total_steps=1)
    plain_cfg = dataclasses.replace(cfg, quantize=None)

    def adapted(lcfg: LoraConfig):
        def build():
            model = Transformer(model_config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
            if lcfg.quantize is not None:
                quantize_base(model, lcfg)
            return apply_lora(model, lcfg, nnx.Rngs(0))
        return split_trainable(nnx.eval_shape(build), trainable_filter("lora"))[1:]

    base = nnx.eval_shape(lambda: Transformer(model_config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    lora_t, lora_f = adapted(plain_cfg)
    _, full_t, full_f = split_trainable(base, trainable_filter("full"))
    return ParamReport(base_params=count_params(nnx.state(base, nnx.Param)), lora_params=count_params(lora_t),
                       lora_modules=len(resolve_targets(cfg, base)), lora_memory=_memory(lora_t, lora_f, opt),
                       full_memory=_memory(full_t, full_f, opt),
                       qlora_memory=_memory(*adapted(cfg), opt) if cfg.quantize is not None else None)
