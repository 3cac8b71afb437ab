"""Model definition: config, layers, attention, the transformer, sharding rules."""
from jaxtune.model.config import ModelConfig, UnsupportedConfigError, from_hf_config
from jaxtune.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "UnsupportedConfigError", "from_hf_config"]
