"""Evaluation: instruction-following checks, over-rigidity probes, forgetting and loss metrics."""
