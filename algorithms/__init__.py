"""Algorithms: the registry, shared tensor math (`common`), critics, one module per algorithm."""
from algorithms import grpo, ppo  # noqa: F401  (register the algorithms)
from algorithms.base import ALGOS, Algorithm, Batch, PolicyForward

__all__ = ["ALGOS", "Algorithm", "Batch", "PolicyForward"]
