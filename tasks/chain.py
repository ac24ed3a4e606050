"""`chain`: running sums of digit chains, the offline testbed with room for critics.

A problem is a start digit and L addends; the answer is the running sum mod 10 after each addend,
written out step by step. The prompt always has `max_steps + ood_steps + 1` addend slots (6 by
default), the unused ones are `.`, so every prompt has the same width and ends in at least one `.`::

    prompt  "4:735...="      (start 4, addends 7, 3, 5)
    answer  "4149"           (4, 4+7=1, 1+3=4, 4+5=9: the start, then one digit per step)

The verifier is exact match on the whole trace (exact and never noisy): a response is right when
every digit is, so a wrong early digit decides failure. The graded format is a digit string of
L + 1 digits.

The design, and why each property the testbed needs holds:

- **Format.** Every warm-start target is a digit string of the right length (noise touches only
  digit *values*), so the warm start answers in the graded format nearly always.
- **A warm start that is right only sometimes.** Each step of a warm-start target is wrong, off
  by one either way, with probability `small_error` (0.1) when its addend is 0-4 and `large_error`
  (0.65) when it is 5-9, and later steps continue from the written, wrong digit (`sft_target`), as a
  careless solver would, who slips on large addends. Supervised training fits that distribution:
  sampled at temperature 1 the warm start gets a step right with probability about 0.63 on
  average, so a chain of L steps about 0.63^L (ID mean over L = 1..4: about 35 %; measured
  38 % avg@8 for seed 2, and 39-41 % for seeds 0 and 2 with large_error 0.6, which is why it is
  0.65; with the hidden addends' 40 % of problems at 1 in 10 at best, 21-27 % for seeds 0-9).
  The right digit is always the most likely one (0.35 against 0.325 for each neighbour on a large
  addend), so RL can sharpen the policy towards it: the gain is precision on every step, not a
  format fix.
- **Values differ across states.** Difficulty is graded and written in the prompt: a prompt's
  success probability is the product of its steps' (0.9 for a small addend, 0.35 for a large one),
  from 0.9 (one small addend) to 0.015 (four large ones), so a critic that counts the prompt's
  large addends and its length explains much of the return's variance; within a response an early
  wrong digit decides failure (every later digit continues from it), so the value also drops at
  the token that was the mistake. A constant baseline can do neither, and only a per-token value
  tells which token was the error. Measured, though, without hidden addends (below) PPO's critic
  does not learn these values in 200 steps (explained variance below 0.1, frozen-critic PPO as
  good: README, "The chain testbed", which has the diagnosis); with them it explains 0.39 of the
  return's variance over the second half of a 120-step run (mean of 10 seeds; 0.63 over steps
  101-200 of 200-step runs, 4 seeds), and frozen-critic PPO still ties (+0.4 points, p = 0.21).
  Where the room is moves as RL sharpens the policy: at the warm start (25 % of samples right) a
  critic that knew each prompt's difficulty would explain 0.33 of the return's variance and one
  that also saw mistakes 0.58 (both without hidden addends); at PPO's step 100 (86 % right) the
  prompt explains only 0.09 of 0.44, every prompt being nearly solved, and the rest is in noticing
  that a digit already written is wrong (its value is 0 from there on). That needs the true running
  sum, which the policy never computes (it continues from the digit it wrote), and the critic,
  a copy of the policy's backbone, does not learn it: on a fixed mid-run policy its value after a
  mistake stays at the value of a right prefix (0.8-0.9 against 0).
- **Difficulty that persists: hidden addends.** A share `hidden_frac` of the train and ID problems
  (default 0.4) show one addend as `?` (which problems and which addend seeded per problem); the
  answer still uses it, so no policy can do better than guess that step: 1 in 10 whatever it
  learns, the problem's `meta["ceiling"]`, which each evaluation records (the mean over its
  problems) and the report's headroom gate measures against. Real benchmarks have such problems
  (beyond the model's reach; RL does not fix them), and they keep what the critic can learn from
  the prompt for the whole run: which prompts are hopeless is in the prompt and stays true. Without
  them (`hidden_frac=0`) RL nearly solves every prompt by mid-run and the critic, which does not
  learn to spot a wrong digit already written (below), is left with nothing it can learn. OOD
  problems show every addend.
- **A budget that stops while RL still learns.** 120 steps, evaluated every 20 (the final score the
  mean of steps 100 and 120; the suite's `train.steps`, `train.eval_every`): by then PPO has gained
  about 27 points ID and is still about 15 below the ceiling (10 seeds); at 200 steps it ends 5
  below it (4 seeds), the visible chains nearly solved, and algorithms would have no room to differ.
- **Errors a critic could see (an option).** `skip_share` of the warm start's step errors repeat the
  previous digit (the addend skipped) instead of being off by one: a mistake visible from the two
  digits alone, no sum needed (default 0: off by one only).
- **A cheap, learnable layout.** One token per step and a fixed prompt width: the addend of step j
  and the response's step j always sit the same distance apart, so a two-layer model attends to
  it by relative position (RoPE), whatever L is. Responses are at most `max_steps` + 2 tokens
  (with EOS), as short as `arith`'s.
- **A real OOD shift: longer chains.** The OOD split has L = `max_steps` + 1 ..
  `max_steps` + `ood_steps` (default 5), lengths RL never trains on. A warm start trained on L <= 4
  alone does not go on past step 4 (0.7 % at L = 5), so its data also holds `warmstart_long` (400)
  chains of the OOD lengths, none of the OOD split's, as a base model has seen a little of
  everything (`warmstart_problems`). The warm start then scores about 0.63^5 = 10 % there (measured 6.5 % for seed 2): above
  its floor, with the same step rule to carry RL's precision over.
- **A warm start that learns the rule on every seed.** 3000 supervised steps (the suite's
  `model.warmstart_steps`): at 1500 one seed of two had not found the step rule (greedy 30 % vs
  100 %). Sampled, the learned warm start matches its data's error rates, which is what makes its
  score stable across machines; greedy decoding picks the mode and scores near 100 % ID, so this
  suite evaluates by sampling (avg@8 at temperature 1).
- **Splits.** Train, ID eval and OOD eval are disjoint sets of problems, all fixed by the run
  seed; every digit value and addend occurs in training. `n_val` (default 0: none) problems of the
  ID lengths, drawn after every other split (so the others stay as they are) and disjoint from train
  and ID, are held out of training and of the warm start and evaluated as `chain_val` (role VAL,
  hidden addends at the same share): `harness tune` selects on it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.errors import HarnessError
from harness.seeding import numpy_rng, uniform
from tasks.base import SUITES, Benchmark, Problem, Suite

PAD = "."
HIDDEN = "?"
GUESS = 0.1  # the chance of a hidden step's digit, whatever the policy: one of 10


@dataclass
class ChainOptions:
    max_steps: int = field(default=4, metadata={"doc": "longest chain in training and ID (L = 1..max_steps)"})
    ood_steps: int = field(default=1, metadata={"doc": "OOD chains are max_steps+1 .. max_steps+ood_steps long"})
    small_error: float = field(default=0.1, metadata={"doc": "probability that a warm-start step with addend 0-4 is off by one (later steps continue from it)"})
    large_error: float = field(default=0.65, metadata={"doc": "probability that a warm-start step with addend 5-9 is off by one (later steps continue from it)"})
    skip_share: float = field(default=0.0, metadata={"doc": "share of warm-start step errors that skip the addend (repeat the previous digit) instead of being off by one"})
    n_train: int = field(default=4000, metadata={"doc": "training problems"})
    warmstart_long: int = field(default=400, metadata={"doc": "problems of the OOD lengths in the warm start's data only (never in RL training)"})
    n_eval: int = field(default=200, metadata={"doc": "problems per evaluation split (ID and OOD)"})
    n_val: int = field(default=0, metadata={"doc": "validation problems of the ID lengths, disjoint from train and ID, evaluated as chain_val (role VAL; 0: none)"})
    hidden_frac: float = field(default=0.4, metadata={"doc": "share of train and ID problems with one addend hidden (`?`): no policy can do better than guess it (1 in 10), a difficulty that persists under RL"})

    def validate(self) -> None:
        if not (1 <= self.max_steps and 1 <= self.ood_steps and self.max_steps + self.ood_steps <= 20):
            raise HarnessError(f"suite.max_steps and suite.ood_steps must be >= 1 with max_steps + ood_steps <= 20, "
                               f"got {self.max_steps} and {self.ood_steps}")
        if not 0 <= self.skip_share <= 1:
            raise HarnessError(f"suite.skip_share must lie in [0, 1], got {self.skip_share}")
        for name in ("small_error", "large_error"):
            if not 0 <= getattr(self, name) < 1:
                raise HarnessError(f"suite.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.warmstart_long < 0:
            raise HarnessError(f"suite.warmstart_long must be >= 0, got {self.warmstart_long}")
        if not 0 <= self.hidden_frac <= 1:
            raise HarnessError(f"suite.hidden_frac must lie in [0, 1], got {self.hidden_frac}")
        if self.n_train < 1 or self.n_eval < 1:
            raise HarnessError("suite.n_train and suite.n_eval must be positive")
        if self.n_val < 0:
            raise HarnessError(f"suite.n_val must be >= 0, got {self.n_val}")


def running_sums(start: int, addends: list[int]) -> list[int]:
    """[start, start + a1, start + a1 + a2, ...] mod 10."""
    out = [start]
    for a in addends:
        out.append((out[-1] + a) % 10)
    return out


def make_problem(start: int, addends: list[int], slots: int) -> Problem:
    digits = "".join(map(str, addends))
    trace = "".join(map(str, running_sums(start, addends)))
    return Problem(id=f"chain:{start}:{digits}", prompt=f"{start}:{digits}{PAD * (slots - len(addends))}=",
                   answer=trace, meta={"steps": len(addends), "start": start, "addends": tuple(addends)})


def hide_addends(problems: list[Problem], frac: float, seed: int, split: str) -> list[Problem]:
    """A share `frac` of the problems with one addend shown as `?` (which problems and which addend
    seeded per problem); the answer still uses the hidden addend, so a solver can only guess that step."""
    out = []
    for p in problems:
        if uniform(seed, "chain-hidden", split, p.id) >= frac:
            out.append(p)
            continue
        steps = p.meta["steps"]
        j = min(int(uniform(seed, "chain-hidden-slot", split, p.id) * steps), steps - 1)
        at = p.prompt.index(":") + 1 + j
        out.append(Problem(id=f"{p.id}:h{j}", prompt=p.prompt[:at] + HIDDEN + p.prompt[at + 1:], answer=p.answer,
                           meta={**p.meta, "hidden": j, "ceiling": GUESS}))
    return out


def draw_problems(rng, lengths: range, n: int, slots: int, exclude: set[str]) -> list[Problem]:
    """`n` distinct problems (none in `exclude`), split evenly over `lengths` (a short length has
    only 10^(L+1) problems: what it lacks is split over the longer ones)."""
    out: list[Problem] = []
    for i, L in enumerate(lengths):
        want = -(-(n - len(out)) // (len(lengths) - i))  # an even share of what is left
        space = 10 ** (L + 1)
        taken = {p for p in exclude if len(p.rsplit(":", 1)[1]) == L}
        got = min(want, space - len(taken))
        chosen: dict[str, Problem] = {}
        for index in rng.permutation(space) if space <= 10 ** 5 else iter(lambda: int(rng.integers(space)), None):
            if len(chosen) == got:
                break
            start, addends = divmod(int(index), 10 ** L)
            p = make_problem(start, [int(d) for d in str(addends).zfill(L)], slots)
            if p.id not in taken:
                chosen[p.id] = p
        out += chosen.values()
    if len(out) < n:
        raise HarnessError(f"the chain suite has too few problems of lengths {lengths.start}..{lengths.stop - 1} "
                           f"for {n} more")
    return out


@SUITES.register("chain")
class ChainSuite(Suite):
    name = "chain"
    description = "running sums of digit chains (mod 10), graded difficulty; OOD = longer chains (offline testbed with room for critics)"
    Options = ChainOptions
    validation_option = "n_val"
    # The suite's evaluation: k samples a problem at the rollout temperature (avg@k), the final score
    # the mean of the last evaluations; room for the OOD chains' longer answers. Its budget: 120
    # steps, evaluated every 20 (module doc, "A budget that stops while RL still learns").
    run_defaults = {"model.warmstart_steps": "3000", "train.steps": "120", "train.eval_every": "20",
                    "train.max_new_tokens": "6", "eval.k": "8", "eval.temperature": "1.0", "eval.final_evals": "2",
                    "eval.max_new_tokens": "8"}

    def __init__(self, options: ChainOptions, seed: int):
        super().__init__(options, seed)
        o = options
        rng = numpy_rng(seed, "suite-data", "chain")
        slots = o.max_steps + o.ood_steps + 1
        id_lengths, ood_lengths = range(1, o.max_steps + 1), range(o.max_steps + 1, o.max_steps + o.ood_steps + 1)
        self._id_eval = draw_problems(rng, id_lengths, o.n_eval, slots, set())
        self._train = draw_problems(rng, id_lengths, o.n_train, slots, {p.id for p in self._id_eval})
        shown = {p.id for p in self._id_eval + self._train}  # before hiding: the ids draw_problems reads
        if o.hidden_frac:
            self._id_eval = hide_addends(self._id_eval, o.hidden_frac, seed, "id")
            self._train = hide_addends(self._train, o.hidden_frac, seed, "train")
        self._ood_eval = draw_problems(rng, ood_lengths, o.n_eval, slots, set())
        self._long = draw_problems(rng, ood_lengths, o.warmstart_long, slots, {p.id for p in self._ood_eval})
        self._val = draw_problems(rng, id_lengths, o.n_val, slots, shown) if o.n_val else []
        if self._val and o.hidden_frac:
            self._val = hide_addends(self._val, o.hidden_frac, seed, "val")

    def train_problems(self) -> list[Problem]:
        return self._train

    def warmstart_problems(self) -> list[Problem]:
        """The train split and `warmstart_long` longer chains (OOD lengths, none of the OOD split's)."""
        return self._train + self._long

    def eval_benchmarks(self) -> list[Benchmark]:
        return [
            Benchmark("chain_id", "ID", self._id_eval, "exact_match-v1"),
            Benchmark("chain_ood", "OOD", self._ood_eval, "exact_match-v1"),
        ] + ([Benchmark("chain_val", "VAL", self._val, "exact_match-v1")] if self._val else [])

    def sft_target(self, problem: Problem) -> str:
        """The trace with each step off by one with probability `small_error` or `large_error` (by its
        addend; seeded per problem and step); later steps add their addends to the written digit."""
        digits = [problem.meta["start"]]
        for j, a in enumerate(problem.meta["addends"]):
            value = (digits[-1] + a) % 10
            u = uniform(self.seed, "chain-sft", problem.id, j)
            error = self.options.large_error if a >= 5 else self.options.small_error
            if u < error * self.options.skip_share:
                value = digits[-1]
            elif u < error:
                value = (value + (1 if u < error * (1 + self.options.skip_share) / 2 else -1)) % 10
            digits.append(value)
        return "".join(map(str, digits))

    def in_format(self, response: str, problem: Problem) -> bool:
        """A digit string of L + 1 digits: the graded format."""
        text = response.strip()
        return bool(re.fullmatch(r"\d+", text)) and len(text) == problem.meta["steps"] + 1

    def extract_answer(self, response: str) -> str | None:
        """The trace a response gives when it is a digit string (pseudo-label votes), else None."""
        text = response.strip()
        return text if re.fullmatch(r"\d+", text) else None

    def grade(self, response: str, problem: Problem) -> float:
        return float(response.strip() == problem.answer)
