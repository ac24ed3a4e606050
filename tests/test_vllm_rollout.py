"""The vLLM backend's weight sync and batching, with a stand-in for the engine (the real engine:
`tests/test_vllm_engine.py`)."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.rollout import generate
from harness.trainer import Trainer
from harness.vllm_rollout import VLLMRollout, check_available, pack_rollout
from tests.conftest import FAST, fast_args


class StandInEngine:
    """The `Engine` interface on the CPU: its own copy of the model, strict name-by-name weight
    loading (an unknown name is an error, as in vLLM), one request at a time with its own seed."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        with torch.no_grad():  # start from other weights, so that only a sync can make them equal
            for p in self.model.parameters():
                p.add_(1.0)
        self.loaded: list[list[str]] = []
        self.requests: list[dict] = []

    def load_weights(self, weights):
        own = self.model.state_dict()
        for name, tensor in weights:
            if name not in own:
                raise KeyError(f"engine has no weight {name!r}")
            own[name].copy_(tensor)
        self.loaded.append([name for name, _ in weights])

    def generate(self, prompts, *, max_tokens, temperature, top_p, seeds, stop_token_ids):
        self.requests.append({"n": len(prompts), "seeds": list(seeds), "max_tokens": max_tokens})
        out = []
        for prompt, seed in zip(prompts, seeds):
            roll = generate(self.model, [prompt], max_new_tokens=max_tokens, eos_id=stop_token_ids[0], pad_id=0,
                            temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed))
            out.append(roll.responses[0, : int(roll.response_mask.sum())].tolist())
        return out


def make_trainer(tmp_path, cache_dir, algo="grpo") -> Trainer:
    # train.old_logp as --rollout vllm resolves it: the trainer recomputes the log-probs it trains on
    overrides = {**FAST, "train.lr": "1e-2", "train.old_logp": "recompute"}
    cell = build_cells("arith", [algo], "flip0.5", [0], tmp_path, steps=2, overrides=overrides)[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


def use_stand_in(trainer: Trainer) -> StandInEngine:
    engine = StandInEngine(trainer.policy)
    trainer.vllm = VLLMRollout(engine, trainer.policy)
    trainer.rollout = trainer.vllm.generate
    return engine


def test_pack_rollout_by_hand():
    roll = pack_rollout([[5, 6], [7]], [[1, 2, 9], [3]], pad_id=0, max_new_tokens=4)
    assert roll.prompt_len == 2
    assert roll.input_ids.tolist() == [[5, 6, 1, 2, 9], [0, 7, 3, 0, 0]]
    assert roll.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert roll.responses.tolist() == [[1, 2, 9], [3, 0, 0]]
    assert roll.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(HarnessError, match="returned 1 responses for 2 prompts"):
        pack_rollout([[5], [6]], [[1]], pad_id=0, max_new_tokens=4)


def test_weights_are_synced_after_every_update_and_heads_stay_out(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    trainer.heads["log_z"] = torch.nn.Linear(4, 1)  # an extra head, as FlowRL's, lives beside the policy
    engine = use_stand_in(trainer)
    policy_names = list(trainer.policy.state_dict())
    assert engine.loaded == [policy_names], "the engine starts from the trainer's weights"
    for step in (1, 2):
        metrics = trainer.train_step(step)
        assert "time/weight_sync" in metrics
        assert len(engine.loaded) == 1 + step
        for name, tensor in trainer.policy.state_dict().items():
            assert torch.equal(engine.model.state_dict()[name], tensor), name
    assert not any("log_z" in name for names in engine.loaded for name in names)


def test_rollout_batches_all_prompts_with_distinct_seeds(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    engine = use_stand_in(trainer)
    trainer.train_step(1)
    t = trainer.cfg.train
    request = engine.requests[0]
    assert request["n"] == t.prompts_per_step * t.group_size, "one engine call per step, every sample in it"
    assert len(set(request["seeds"])) == request["n"], "the G copies of a prompt must sample independently"
    assert request["max_tokens"] == t.max_new_tokens
    # Reproducible from the global seed: a fresh trainer asks for the same seeds.
    again = make_trainer(tmp_path / "again", cache_dir)
    engine2 = use_stand_in(again)
    again.train_step(1)
    assert engine2.requests[0]["seeds"] == request["seeds"]


def test_missing_vllm_or_gpu_is_one_clear_line(tmp_path, capsys):
    if torch.cuda.is_available() or importlib.util.find_spec("vllm") is not None:
        pytest.skip("a GPU or vLLM is here (tests/test_vllm_engine.py runs the real engine)")
    with pytest.raises(HarnessError, match="train.rollout=vllm needs"):
        check_available()
    code = main(["run", "--rollout", "vllm", "--out", str(tmp_path / "runs"), "--quiet", *fast_args()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "train.rollout=vllm needs" in err
    assert not (tmp_path / "runs").exists()
    assert main(["run", "--set", "train.rollout=sglang", "--out", str(tmp_path / "r2"), *fast_args()]) == 2
    assert "train.rollout must be hf or vllm" in capsys.readouterr().err
