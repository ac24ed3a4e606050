"""Task suites: registry, problems and graders.

Every module of this package is imported here, so a suite registers itself by being a module
with an `@SUITES.register(name)` class: the testbeds `chain` and `arith` each in its own module
with its problems, the cross-domain suites `math`, `science` and `dialogue` in `suites.py`, built
from the benchmarks and graders of the `benchmarks` subpackage (one module per domain).
"""
import importlib
import pkgutil

from tasks.base import SUITES, Benchmark, Problem, Suite

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["SUITES", "Benchmark", "Problem", "Suite"]
