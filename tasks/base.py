"""What a task suite provides to the training core: problems, benchmarks with roles, a grader."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.registry import Registry


@dataclass(frozen=True)
class Problem:
    id: str  # stable across runs: noise draws and pseudo-labels are keyed by it
    prompt: str
    answer: str
    # meta["ceiling"], where a suite sets it: the best expected score any policy can reach on the
    # problem (1 when absent; below 1 when it can only be guessed). An eval row records its problems'
    # mean as `ceiling`, which the report's headroom gate measures against.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Benchmark:
    name: str
    role: str  # "ID" or "OOD" (test benchmarks), or "VAL" (a validation split: what `harness tune` selects on)
    problems: list[Problem]
    grader: str  # name and version of the grader, stored with every eval row
    template: str = ""  # prompt template id, stored with every eval row (with "/chat" or "/raw")


class Suite:
    """A task suite. Subclasses set `name`, `description`, `Options` and implement the methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type]
    # The option that holds out a validation split (benchmarks of role VAL, disjoint from the
    # test benchmarks), e.g. "n_val"; "" for a suite without one. `harness tune` sets it.
    validation_option: ClassVar[str] = ""

    def __init__(self, options: Any, seed: int):
        self.options = options
        self.seed = seed

    def train_problems(self) -> list[Problem]:
        raise NotImplementedError

    def eval_benchmarks(self) -> list[Benchmark]:
        raise NotImplementedError

    def grade(self, response: str, problem: Problem) -> float:
        """Clean reward of one response: 1.0 correct, 0.0 wrong (a verifier, never noisy)."""
        raise NotImplementedError

    def extract_answer(self, response: str) -> str | None:
        """The answer a response commits to, normalised as the grader reads it, or None when it
        gives none: two responses that the grader reads as the same answer extract to the same
        string (pseudo-label votes, the simulated verifiers' answer features). By default the
        stripped response."""
        return response.strip() or None

    def answer_correct(self, answer: str, problem: Problem) -> bool:
        """Whether an extracted answer equals the problem's gold answer under the grader, whatever
        format the response that gave it was written in. By default: the answer, graded as a
        response, scores 1."""
        return self.grade(answer, problem) >= 1.0

    def vote(self, response: str, problem: Problem) -> tuple[str | None, float]:
        """One pseudo-label vote: (the response's extracted answer or None, 1.0 when that answer
        equals the gold one, else 0.0). Format variants of one answer vote together."""
        answer = self.extract_answer(response)
        return answer, float(answer is not None and self.answer_correct(answer, problem))

    def warmstart_problems(self) -> list[Problem]:
        """The problems a supervised warm start trains on: the train split, unless a suite gives its
        warm start more (a base model has seen more than RL trains on)."""
        return self.train_problems()

    def sft_target(self, problem: Problem) -> str:
        """The response text a supervised warm start trains on."""
        return problem.answer

    def format_prompt(self, problem: Problem, tokenizer) -> str:
        """The prompt text, through the tokenizer's chat template when it has one."""
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": problem.prompt}], tokenize=False, add_generation_prompt=True
            )
        return problem.prompt


SUITES: Registry[type[Suite]] = Registry("suite")
