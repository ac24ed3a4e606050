"""Reward-noise injectors and the noise-setting grammar (``flip0.2``, ``fn0.3+gauss0.1``, ``none,flip0.2``)."""
from noise.injectors import NOISE, Injector, NoiseContext, injector, list_noise
from noise.spec import NoiseSpec, format_param, parse_noise, parse_noise_list

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
