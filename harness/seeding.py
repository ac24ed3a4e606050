"""One global seed derives every random stream.

Streams are named by a tuple of labels (``("noise", step, prompt_id, sample)``), hashed with
BLAKE2b, so adding a stream never shifts the numbers of another one.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for the stream ``labels`` under the global ``seed``."""
    text = "\x1f".join([str(int(seed))] + [str(label) for label in labels])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def uniform(seed: int, *labels: object) -> float:
    """A deterministic U[0, 1) draw for the stream ``labels`` (one draw per stream)."""
    return derive_seed(seed, *labels) / float(1 << 63)


def torch_generator(seed: int, *labels: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *labels))
    return gen


def numpy_rng(seed: int, *labels: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *labels))


def seed_everything(seed: int, *labels: object) -> None:
    """Seed the global torch/numpy/random state (used only around model and head initialisation)."""
    s = derive_seed(seed, *labels)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)
