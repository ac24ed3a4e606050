"""A local model folder checked before anything loads it (`harness run`, `eval`, `plan`, `bench`):
what transformers would otherwise turn into a traceback, a question on the terminal, or code run.

- `config.json` must be a JSON object with a `model_type` (a run store cell's folder is named as
  such, with the path of its saved model);
- a folder that ships its own Python code (`auto_map` in `config.json` or `tokenizer_config.json`)
  is refused unless `model.trust_remote_code` is on (`--trust-remote-code`); every load passes
  `trust_remote_code` explicitly, so transformers never asks and never runs such code by default;
- the shape numbers of the config (layers, sizes, heads, vocabulary) are positive integers within
  `SHAPE_BOUNDS`, so a plan or a load cannot hang on 10^12 layers;
- with `weights`: safetensors weights whose header and size agree (a truncated or random file is
  named), never only pickle weights (`pytorch_model.bin`: unpickling can run code), and tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import store
from harness.errors import HarnessError

TRUST_OPTION = "--trust-remote-code (model.trust_remote_code=true)"
# Upper bounds of a model config's shape numbers: above today's largest open models by 4-100x.
SHAPE_BOUNDS = {
    "num_hidden_layers": 1024,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 16_384,
    "vocab_size": 16_777_216,
    "max_position_embeddings": 134_217_728,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
MAX_HEADER = 100 * 1024 * 1024  # bytes of a safetensors header (the format's own limit)


def refuse(folder: Path, what: str) -> HarnessError:
    return HarnessError(f"model folder {str(folder)!r} {what}")


def is_cell(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("status.json", "metrics.jsonl", "eval.jsonl"))


def check_shape(config: dict[str, Any], where: str) -> None:
    """Every shape number present in `config` (and its `text_config`) a positive integer within SHAPE_BOUNDS."""
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key, bound in SHAPE_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise HarnessError(f"{where}: {key} must be a positive integer, got {json.dumps(value)[:40]}")
            if not 1 <= value <= bound:
                raise HarnessError(f"{where}: {key} must be in 1..{bound}, got {value}")


def needs_remote_code(folder: Path) -> str | None:
    """The file whose `auto_map` asks for the folder's own Python code, or None."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                data = store.read_json(path)
            except store.StoreError:
                if name == "config.json":
                    raise
                continue
            if data.get("auto_map"):
                return name
    return None


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors end exactly at the file's end."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise HarnessError(f"{str(path)!r}: not a safetensors file, or truncated ({size} bytes)")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise HarnessError(f"{str(path)!r}: not a safetensors file (its header is not valid)") from None
    if 8 + n + max(ends, default=0) != size:
        raise HarnessError(f"{str(path)!r}: truncated or damaged safetensors file ({size} bytes, its header "
                           f"describes {8 + n + max(ends, default=0)})")


def check_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = store.read_json(index, dict, ("weight_map",))["weight_map"]
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise HarnessError(f"{str(index)!r}: a shard name must be a file name of the folder, got {shard!r}")
            if not (folder / shard).is_file():
                raise refuse(folder, f"lacks the weights shard {shard!r} its model.safetensors.index.json names")
            check_safetensors(folder / shard)
        if shards:
            return
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for path in files:
            check_safetensors(path)
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse(folder, f"holds only pickle weights ({', '.join(pickles[:3])}), which the harness does not load "
                             "(unpickling can run code): save the model with safetensors (save_pretrained's default)")
    raise refuse(folder, "has no weights (model.safetensors, as save_pretrained writes them)")


def check_model_folder(folder: Path, trust_remote_code: bool = False, weights: bool = True) -> dict[str, Any]:
    """The folder's config.json once the folder passes the checks of the module docstring; a
    one-line `HarnessError` otherwise. `weights=False` checks the config only (`harness plan`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise HarnessError(f"--model {str(folder)!r}: no such folder")
    config_path = folder / "config.json"
    if is_cell(folder) and (not config_path.is_file() or "model_type" not in _json_or_empty(config_path)):
        saved = folder / "model"
        hint = (f"its trained model is {str(saved)!r}" if saved.is_dir() else
                "it saved no model (harness run --save-model final writes one to its model/)")
        raise refuse(folder, f"is a run store cell, not a model folder: {hint}")
    if not config_path.is_file():
        raise refuse(folder, "has no config.json: a model folder holds config.json, the weights (model.safetensors) "
                             "and the tokenizer's files, as save_pretrained writes them")
    config = store.read_json(config_path)
    if not isinstance(config.get("model_type"), str):
        raise refuse(folder, "has a config.json without a model_type: not a transformers model config")
    asks = needs_remote_code(folder)
    if asks and not trust_remote_code:
        raise refuse(folder, f"ships its own Python code (auto_map in its {asks}), which the harness does not run; "
                             f"{TRUST_OPTION} allows it, if you trust the folder")
    check_shape(config, str(config_path))
    if weights:
        check_weights(folder)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise refuse(folder, f"has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return config


def _json_or_empty(path: Path) -> dict:
    try:
        return store.read_json(path)
    except store.StoreError:
        return {}


def load_error(name: str, exc: BaseException, local: bool) -> HarnessError:
    """A model load that failed anyway (a hub id, a damaged file the checks let through), as one line."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if "trust_remote_code" in str(exc):
        return HarnessError(f"model {name!r} needs its own Python code, which the harness does not run; "
                            f"{TRUST_OPTION} allows it, if you trust it")
    where = "local folder" if local else "Hugging Face id (offline? pass a local folder instead)"
    return HarnessError(f"cannot load model {name!r} as a {where}: {type(exc).__name__}: {text}")
