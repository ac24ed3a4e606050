"""`arith`: procedurally generated integer arithmetic, the offline testbed.

Problems are `a+b=` and `a-b=` with operands in [min_operand, max_operand], always written with
the larger operand first (a >= b) in training and in the in-domain (ID) split. The out-of-domain
(OOD) split asks `a+b=` with a < b: operand order never seen in training, so the model must
have learned that addition commutes rather than a lookup keyed on the written order. Every
operand and answer value occurs in training. Train and ID-eval splits are disjoint.
Everything is fixed by the run seed.

For an instruction-tuned model (SmolLM2), which answers in sentences: `suite.prompt_style=question`
asks "What is a+b? Reply with the number only." and `suite.grading=last_number` takes the last
integer of the response as its answer (the defaults, `a+b=` and an exact bare number, are the tiny
model's testbed).

Validation (`suite.n_val`, 0 by default: none): that many problems held out of the train split
(never trained on, warm start included), evaluated as `arith_val` with role VAL. It is disjoint
from both test splits (ID: held out before it; OOD: the other operand order); `harness tune`
selects on it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.errors import HarnessError
from harness.seeding import numpy_rng, uniform
from tasks.base import SUITES, Benchmark, Problem, Suite


@dataclass
class ArithOptions:
    ops: str = field(default="+-", metadata={"doc": "operators drawn: any of + and -"})
    min_operand: int = field(default=0, metadata={"doc": "smallest operand"})
    max_operand: int = field(default=29, metadata={"doc": "largest operand"})
    n_train: int = field(default=4000, metadata={"doc": "training problems"})
    verbose_frac: float = field(default=0.5, metadata={"doc": "fraction of warm-start targets in the verbose style the verifier rejects"})  # fraction of warm-start targets written as "is <answer>"
    n_eval: int = field(default=200, metadata={"doc": "problems per evaluation split (ID and OOD)"})
    n_val: int = field(default=0, metadata={"doc": "validation problems held out of the train split, evaluated as arith_val (role VAL; 0: none)"})
    # For an instruction-tuned model, which writes sentences, not the bare "a+b=" completion
    prompt_style: str = field(default="expr", metadata={"doc": "expr: 'a+b='; question: 'What is a+b? Reply with the number only.' (instruction-tuned models)"})
    grading: str = field(default="exact", metadata={"doc": "exact: the response is the bare number; last_number: the last integer in the response is the answer"})

    def validate(self) -> None:
        if not self.ops or set(self.ops) - set("+-*"):
            raise HarnessError(f"suite.ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if not 0 <= self.min_operand < self.max_operand:
            raise HarnessError(f"suite operands must satisfy 0 <= min_operand < max_operand, got "
                               f"{self.min_operand}, {self.max_operand}")
        if "+" not in self.ops:
            raise HarnessError("suite.ops must include '+': the OOD split is a+b with the smaller operand first")
        if not 0 <= self.verbose_frac <= 1:
            raise HarnessError(f"suite.verbose_frac must lie in [0, 1], got {self.verbose_frac}")
        if self.n_train < 1 or self.n_eval < 1:
            raise HarnessError("suite.n_train and suite.n_eval must be positive")
        if self.prompt_style not in PROMPT_STYLES:
            raise HarnessError(f"suite.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if self.grading not in GRADERS:
            raise HarnessError(f"suite.grading must be one of {', '.join(GRADERS)}, got {self.grading!r}")
        size = id_space_size(self)
        room = size - min(self.n_eval, size // 2) - 1  # the train split keeps at least one problem
        if not 0 <= self.n_val <= room:
            raise HarnessError(f"suite.n_val must lie in [0, {room}] (the train split keeps a problem), got {self.n_val}")


def id_space_size(o: ArithOptions) -> int:
    """Problems with the larger operand first: the ID space that train, validation and ID split."""
    n = o.max_operand - o.min_operand + 1
    return len(o.ops) * n * (n + 1) // 2


PROMPT_STYLES = {"expr": "{expr}=", "question": "What is {expr}? Reply with the number only."}
GRADERS = {"exact": "exact_match-v1", "last_number": "last_number-v1"}  # the grader id each eval row records


def make_problem(a: int, op: str, b: int, style: str = "expr") -> Problem:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    text = PROMPT_STYLES[style].format(expr=f"{a}{op}{b}")
    return Problem(id=f"arith:{a}{op}{b}", prompt=text, answer=str(value))


@SUITES.register("arith")
class ArithSuite(Suite):
    name = "arith"
    description = "integer arithmetic a+b, a-b; OOD = operand order unseen in training (offline testbed)"
    Options = ArithOptions
    validation_option = "n_val"

    def __init__(self, options: ArithOptions, seed: int):
        super().__init__(options, seed)
        o = options
        rng = numpy_rng(seed, "suite-data", "arith")
        operands = range(o.min_operand, o.max_operand + 1)
        id_space = [make_problem(a, op, b, o.prompt_style) for a in operands for b in operands for op in o.ops if a >= b]
        ood_space = [make_problem(a, "+", b, o.prompt_style) for a in operands for b in operands if a < b]
        order = rng.permutation(len(id_space))
        n_eval = min(o.n_eval, len(id_space) // 2)
        self._id_eval = [id_space[i] for i in order[:n_eval]]
        self._val = [id_space[i] for i in order[n_eval:n_eval + o.n_val]]
        start = n_eval + o.n_val
        self._train = [id_space[i] for i in order[start:start + o.n_train]]
        ood_order = rng.permutation(len(ood_space))
        self._ood_eval = [ood_space[i] for i in ood_order[:o.n_eval]]

    def train_problems(self) -> list[Problem]:
        return self._train

    def eval_benchmarks(self) -> list[Benchmark]:
        grader = GRADERS[self.options.grading]
        return [
            Benchmark("arith_id", "ID", self._id_eval, grader),
            Benchmark("arith_ood", "OOD", self._ood_eval, grader),
        ] + ([Benchmark("arith_val", "VAL", self._val, grader)] if self._val else [])

    def sft_target(self, problem: Problem) -> str:
        if uniform(self.seed, "sft-style", problem.id) < self.options.verbose_frac:
            return f"is {problem.answer}"
        return problem.answer

    def grade(self, response: str, problem: Problem) -> float:
        if self.options.grading == "last_number":
            return float(self.extract_answer(response) == problem.answer)
        return float(response.strip() == problem.answer)

    def extract_answer(self, response: str) -> str | None:
        """The last integer in the response ("is 12" -> "12"), or None: the number the response
        gives, whether or not it is in the graded format (a bare number)."""
        numbers = re.findall(r"-?\d+", response)
        return str(int(numbers[-1])) if numbers else None
