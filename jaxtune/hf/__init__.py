"""Hugging Face checkpoints: the family table (`families`, built from `config` translation parts and `tensors`
rules), the safetensors format, loading and saving."""
