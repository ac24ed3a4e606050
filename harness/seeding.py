"""One global seed derives every random stream.

Streams are named by a tuple of labels (``("noise", step, prompt_id, sample)``), hashed with
BLAKE2b, so adding a stream never shifts the numbers of another one.
"""
from __future__ import annotations

import functools
import hashlib
import random
from typing import Any

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


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) global RNG states as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states, wherever the checkpoint's tensors were loaded (RNG states are
    CPU ByteTensors; the CUDA ones are restored only where CUDA is)."""
    torch.set_rng_state(rng["torch"].cpu())
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = rng["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]][:torch.cuda.device_count()])


@functools.lru_cache(maxsize=2)  # a step's prompts span at most two epochs
def epoch_order(seed: int, n: int, epoch: int) -> list[int]:
    """The train split's seeded order in `epoch`."""
    return torch.randperm(n, generator=torch_generator(seed, "data-order", epoch)).tolist()
