"""jaxtune: supervised instruction tuning of Hugging Face causal LMs in JAX/Flax NNX."""

# Before anything imports jax: the CPU process defaults (jaxtune/cpu_runtime.py; opt out:
# JAXTUNE_XLA_CPU_FLAGS=0, JAXTUNE_CPU_MALLOC=0).
from jaxtune import cpu_runtime as _cpu_runtime

_cpu_runtime.apply_default_cpu_flags()
_cpu_runtime.tune_malloc()

__version__ = "0.1.0"

# Lazy public surface: `jaxtune eval ifeval` and other light commands should not pay for importing jax.
_EXPORTS = {
    "load_pretrained": "jaxtune.convert.hf_load",
    "load_tokenizer": "jaxtune.convert.hf_load",
    "load_config": "jaxtune.convert.hf_load",
    "ModelConfig": "jaxtune.model.config",
    "Transformer": "jaxtune.model.transformer",
    "LoraConfig": "jaxtune.lora",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
