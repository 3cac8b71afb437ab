"""Data curation before training: quality filters and dedup, Self-Instruct generation, SDFT rewriting."""
