"""HF ↔ jaxtune: the name tables, checkpoint loading and saving."""
