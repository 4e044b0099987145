"""Evaluation of merged models, deterministic subsets, the eval index, and sweeps."""
