"""jaxtune: supervised instruction tuning of Hugging Face causal LMs in JAX/Flax NNX."""

__version__ = "0.1.0"

from jaxtune.convert.hf_load import load_config, load_pretrained, load_tokenizer  # noqa: E402
from jaxtune.model import ModelConfig, Transformer  # noqa: E402

__all__ = ["ModelConfig", "Transformer", "load_config", "load_pretrained", "load_tokenizer", "__version__"]
