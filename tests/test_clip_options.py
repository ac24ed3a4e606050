"""The clip/KL options every PPO-clip algorithm shares are declared once (`algorithms.clip.ClipOptions`)
and an algorithm's registered name once (`algorithms.base.register`)."""
import dataclasses

import pytest

from algorithms import ALGOS
from algorithms.base import with_defaults
from algorithms.clip import ClipActor, ClipOptions

CLIP_ALGOS = [name for name in ALGOS.names() if issubclass(ALGOS.get(name), ClipActor)]
SHARED = {f.name: f for f in dataclasses.fields(ClipOptions)}


def test_the_shared_options_are_the_eight_the_actor_reads():
    assert list(SHARED) == ["clip_low", "clip_high", "dual_clip", "kl_mode", "kl_coef", "kl_loss_kind", "agg_mode",
                            "entropy_coef"]
    assert "rloo" in CLIP_ALGOS and "dapo" in CLIP_ALGOS and "flowrl" not in CLIP_ALGOS


@pytest.mark.parametrize("name", CLIP_ALGOS)
def test_every_clip_algorithm_takes_the_shared_options_and_their_docs_from_clip_options(name):
    cls = ALGOS.get(name)
    assert cls.name == name  # registered under the name it declares
    assert issubclass(cls.Options, ClipOptions)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    for key, shared in SHARED.items():
        assert fields[key].metadata["doc"] == shared.metadata["doc"]


def test_with_defaults_changes_only_the_defaults():
    derived = with_defaults(ClipOptions, kl_mode="loss", kl_coef=0.04)
    assert [f.name for f in dataclasses.fields(derived)] == list(SHARED)  # same fields, same places
    opts = derived()
    assert (opts.kl_mode, opts.kl_coef, opts.clip_low) == ("loss", 0.04, 0.2)
    assert dataclasses.fields(derived)[3].metadata == SHARED["kl_mode"].metadata
    with pytest.raises(KeyError, match="kl_cof"):
        with_defaults(ClipOptions, kl_cof=0.1)
