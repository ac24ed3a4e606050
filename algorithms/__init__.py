"""Algorithms: the registry, shared tensor math (`common`), the PPO-clip actor and its shared options
(`clip`), critics, one module per algorithm.

Every module of this package is imported here, so an algorithm registers itself by being a
module with a class decorated `@register` (`algorithms.base`; it registers the class under its
`name`): adding one is one new file.
"""
import importlib
import pkgutil

from algorithms.base import ALGOS, Algorithm, Batch, PolicyForward

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ALGOS", "Algorithm", "Batch", "PolicyForward"]
