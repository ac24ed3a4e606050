"""Reward-noise injectors and the noise-setting grammar (``flip0.2``, ``fn0.3+gauss0.1``, ``none,flip0.2``).

Every module of this package is imported here, so an injector registers itself by being a module
with an ``@injector(name)`` class (an ``Injector`` subclass): adding one is one new file.
"""
import importlib
import pkgutil

from noise.injectors import NOISE, Injector, NoiseContext, injector, list_noise
from noise.spec import NoiseSpec, format_param, parse_noise, parse_noise_list

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "NOISE",
    "Injector",
    "NoiseContext",
    "NoiseSpec",
    "format_param",
    "injector",
    "list_noise",
    "parse_noise",
    "parse_noise_list",
]
