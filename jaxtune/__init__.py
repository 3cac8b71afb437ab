"""jaxtune: supervised instruction tuning of Hugging Face causal LMs in JAX/Flax NNX.

Importing jaxtune changes nothing in the process and imports nothing heavy: the public names below load
their modules on first use. On a CPU, call `jaxtune.apply_cpu_defaults()` before anything imports jax to get
the XLA flag and malloc settings the `jaxtune` command applies (see `jaxtune/runtime.py`).
"""

from jaxtune.version import __version__

_EXPORTS = {
    "load_pretrained": "jaxtune.hf.load",
    "load_tokenizer": "jaxtune.hf.load",
    "load_config": "jaxtune.hf.load",
    "ModelConfig": "jaxtune.model.config",
    "Transformer": "jaxtune.model.transformer",
    "LoraConfig": "jaxtune.lora.config",
    "apply_cpu_defaults": "jaxtune.runtime",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
