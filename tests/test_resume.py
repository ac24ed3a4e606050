"""Exact resume for every registered algorithm: a cell stopped in the middle of its run and resumed
from its checkpoint writes the same metrics and evaluations as one run straight through."""
from __future__ import annotations

from pathlib import Path

import pytest

from algorithms import ALGOS
from harness import checkpoints
from harness.resolver import build_cells
from harness.trainer import Trainer
from tests.conftest import FAST
from tests.test_training import strip_timing

STEPS, CKPT_EVERY, STOP_AT = 4, 2, 4  # checkpoint at step 2; stopped at the start of step 4, after step 3's line
SMALL = {**FAST, "train.prompts_per_step": "2", "train.max_new_tokens": "4", "suite.n_eval": "8",
         "dvpo.n_quantiles": "20", "dfpo.flow_width": "16", "dfpo.n_samples": "4"}


SECTIONS = ("model", "suite", "train", "eval")


class Stop(Exception):
    pass


def trainer(algo: str, out: Path, cache_dir: Path) -> Trainer:
    cell = build_cells("arith", [algo], "flip0.3", [0], out, steps=STEPS,
                       overrides={k: v for k, v in SMALL.items() if k.split(".")[0] in (*SECTIONS, algo)})[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("algo", ALGOS.names())
def test_resume_mid_run_repeats_the_uninterrupted_run(algo, tmp_path, cache_dir, monkeypatch):
    straight = trainer(algo, tmp_path / "straight", cache_dir)
    straight.run(ckpt_every=CKPT_EVERY)

    stopped = trainer(algo, tmp_path / "resumed", cache_dir)
    train_step = Trainer.train_step

    def stop_at(self, step):
        if step == STOP_AT:
            raise Stop
        return train_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", stop_at)
    with pytest.raises(Stop):
        stopped.run(ckpt_every=CKPT_EVERY)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert checkpoints.latest_checkpoint(stopped.cell)[0] == CKPT_EVERY
    assert len(strip_timing(stopped.cell / "metrics.jsonl")) == STOP_AT - 1  # step 3 is past the checkpoint

    resumed = trainer(algo, tmp_path / "resumed", cache_dir)  # a fresh process's view: nothing kept in memory
    resumed.run(ckpt_every=CKPT_EVERY)
    assert resumed.start_step == CKPT_EVERY
    for name in ("metrics.jsonl", "eval.jsonl"):
        expected, got = strip_timing(straight.cell / name), strip_timing(resumed.cell / name)
        assert len(got) == len(expected)
        for row_expected, row_got in zip(expected, got):
            assert row_got == row_expected, {k: (v, row_got.get(k)) for k, v in row_expected.items()
                                             if row_got.get(k) != v}
