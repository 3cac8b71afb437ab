"""Hugging Face checkpoints: the family table (config translation, tensor names), loading, saving."""
