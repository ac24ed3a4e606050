"""The contract between an algorithm and the training core.

The trainer never branches on an algorithm's name. An algorithm *declares* what it needs:

- `critic`: the critic kind, a key of `algorithms.critics.CRITICS` (`"none"`, `"scalar"`, and later
  `"quantile"`, `"flow"`), with `critic_options()` passed to that critic's head;
- `needs_reference()`: whether reference log-probs (a frozen copy of the initial policy) are computed;
- `extra_heads(hidden_size)`: extra trainable modules on the policy (FlowRL's log-partition head),
  optimised with the actor and never part of the rollout engine's weights;
- `needs_hidden`: whether the actor loss needs the policy's last hidden states;
- `heads_lr_scale()`: the extra heads' learning rate as a multiple of the actor's;
- `keep_groups(scores)` and `extra_sampling_rounds()`: dynamic sampling (DAPO). When
  `keep_groups` returns a mask, the trainer trains only on the kept groups and rolls out up to
  `extra_sampling_rounds()` more rounds of fresh prompts to fill `prompts_per_step` groups;
- `entropy_needs_grad()`: whether `actor_loss` differentiates `fwd.entropy` (an entropy bonus);
  otherwise the trainer computes the entropy without a graph, for the metric only;
- `cell_options(options, train)` (a classmethod): the Options of a cell with the values that
  stand for something resolved against the cell's `TrainConfig` (GRPO's `agg_norm_const=0` becomes
  `train.max_new_tokens`); the grid stores the result in the cell's config.json;

and supplies the math:

- `advantages(batch)`: fills `batch["advantages"]` (and `batch["returns"]` for critics) in place;
- `actor_loss(mb, fwd, heads)`: the policy loss on a minibatch;
- `critic_loss(mb, critic, generator)`: the critic loss on a minibatch (critic algorithms only); it
  receives the critic module (`harness.critics.Critic`) so that it can evaluate the head as it
  needs (`critic.on_batch(mb)` for the head's output, `critic.states(...)` and the head's own
  methods for critics such as a flow field that are queried at sampled points), and a
  `torch.Generator` keyed by (seed, step, minibatch) for any random draw the loss makes.

Random state: an algorithm, critic or head holds none. Every draw comes from a generator the
trainer derives from the global seed and what is sampled (`harness.seeding`), or from the global
torch RNG (dropout), which the checkpoint saves; so a resumed run repeats an uninterrupted one.
An algorithm that must keep state across steps defines `state_dict()` / `load_state_dict()`, and the
trainer checkpoints it (tensors, numbers, strings and lists or dicts of them only).

Batch keys the trainer provides (B sequences, P prompt columns, T response columns):
`input_ids [B, P+T]`, `attention_mask [B, P+T]`, `responses [B, T]`, `response_mask [B, T]`,
`old_logp [B, T]`, `ref_logp [B, T]` (if needed), `scores [B]` (training reward, after noise),
`clean_scores [B]`, `group_ids [B]`, `old_values [B, T, ...]` (the critic head's output before the
update, computed without gradients), `rollout_weight [B, T]` (the sampler/trainer mismatch correction's
importance weights, `algorithms.common.rollout_correction`, only under `train.rollout_correction` and
only for an algorithm that declares `supports_rollout_correction`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.registry import Registry


class Batch(dict):
    """A dict of tensors whose first dimension is the sequence; `prompt_len` rides along."""

    def __init__(self, *args, prompt_len: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_len = prompt_len

    def select(self, index: torch.Tensor) -> "Batch":
        return Batch({k: v[index] for k, v in self.items()}, prompt_len=self.prompt_len)

    @property
    def size(self) -> int:
        return next(iter(self.values())).shape[0]


@dataclass
class PolicyForward:
    """The policy's forward on a minibatch, with gradients."""

    logp: torch.Tensor  # [B, T]
    entropy: torch.Tensor  # [B, T]
    hidden: torch.Tensor | None  # [B, P+T, d] when `needs_hidden`


LossAndMetrics = tuple[torch.Tensor, dict[str, float]]


class Algorithm:
    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    Options: ClassVar[type]
    critic: ClassVar[str] = "none"
    needs_hidden: ClassVar[bool] = False
    # Whether `actor_loss` weighs its per-token loss by `mb["rollout_weight"]` (train.rollout_correction)
    supports_rollout_correction: ClassVar[bool] = False
    # The algorithm's own knobs for `harness tune`, beside the shared ones (algorithms.search)
    SEARCH_SPACE: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any):
        self.opts = options

    def needs_reference(self) -> bool:
        return False

    def critic_options(self) -> dict[str, Any]:
        return {}

    def extra_heads(self, hidden_size: int) -> dict[str, nn.Module]:
        return {}

    def heads_lr_scale(self) -> float:
        return 1.0

    def keep_groups(self, scores: torch.Tensor) -> torch.Tensor | None:
        """`scores [n, G]` (training rewards of n groups of G samples) -> `[n]` bool, the groups to
        train on; None (the default) keeps every group and draws no extra prompts."""
        return None

    def extra_sampling_rounds(self) -> int:
        return 0

    def entropy_needs_grad(self) -> bool:
        return False

    @classmethod
    def cell_options(cls, options: Any, train: Any) -> Any:
        """The options one cell trains with, given its `train` config (a default that stands for a train value)."""
        return options

    def min_group_size(self) -> int:
        """The least `train.group_size` that trains: 2 for an algorithm whose advantage compares the
        samples of a group (a group of one gets advantage 0 and nothing is learnt)."""
        return 1

    def advantages(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def actor_loss(self, mb: Batch, fwd: PolicyForward, heads: nn.ModuleDict) -> LossAndMetrics:
        raise NotImplementedError

    def critic_loss(self, mb: Batch, critic: nn.Module, generator: torch.Generator) -> LossAndMetrics:
        raise NotImplementedError(f"{self.name} has no critic")


ALGOS: Registry[type[Algorithm]] = Registry("algorithm")


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: register an algorithm in `ALGOS` under its `name`."""
    ALGOS.add(cls.name, cls)
    return cls


def with_defaults(options: type, **defaults: Any) -> type:
    """A dataclass deriving from `options` whose listed fields get new defaults, keeping their
    types, docs and places (an option shared by several algorithms is declared once, each sets its
    own default). Raises KeyError for a name that is not a field of `options`."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise KeyError(f"{options.__name__} has no option {unknown}")
    hints = typing.get_type_hints(options)
    derived = dataclasses.make_dataclass(
        options.__name__,
        [(k, hints[k], dataclasses.field(default=v, metadata=fields[k].metadata)) for k, v in defaults.items()],
        bases=(options,),
    )
    derived.__module__ = options.__module__
    return derived


def register_variant(base: type[Algorithm], name: str, description: str, paper: str | None = None,
                     **defaults: Any) -> type[Algorithm]:
    """Register `name` as the algorithm `base` with other option defaults (an ablation of it, or a
    named recipe such as Dr. GRPO): an Options subclass whose listed fields get new defaults
    (`with_defaults`; every field stays overridable with `--set name.KEY=...`), and a `base`
    subclass with its own name, description and (if given) paper."""
    options = with_defaults(base.Options, **defaults)
    options.__name__ = options.__qualname__ = "".join(part.capitalize() for part in name.split("_")) + "Options"
    options.__module__ = base.__module__
    attrs = {"name": name, "description": description, "Options": options, "__module__": base.__module__}
    if paper is not None:
        attrs["paper"] = paper
    cls = type(options.__name__[:-len("Options")], (base,), attrs)
    ALGOS.add(name, cls)
    return cls


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid token; `mask [B, T]` right-padded -> `[B]` (0 for empty rows)."""
    return (mask.sum(-1).long() - 1).clamp(min=0)


def informative_groups(scores: torch.Tensor) -> torch.Tensor:
    """`scores [n, G]` -> `[n]` bool: True where a group's rewards are not all equal (DAPO)."""
    return scores.amax(-1) > scores.amin(-1)


def outcome_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's outcome reward on its last valid token: `[B]` -> `[B, T]`."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    rewards[torch.arange(mask.shape[0]), last_token_index(mask)] = scores.float()
    return rewards * mask
