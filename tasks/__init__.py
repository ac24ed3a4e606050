"""Task suites: registry, problems and graders.

Every module of this package is imported here, so a suite registers itself by being a module
with an `@SUITES.register(name)` class.
"""
import importlib
import pkgutil

from tasks.base import SUITES, Benchmark, Problem, Suite

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["SUITES", "Benchmark", "Problem", "Suite"]
