"""The papers' cross-domain protocol: `math`, `science` and `dialogue` suites built from benchmarks.

    --suite math       train on MATH train; ID = MATH500, AIME24, AMC23, Minerva; OOD = GPQA, HLE, SimpleQA
    --suite science    train on SimpleQA's training part; ID = GPQA, HLE, SimpleQA; OOD = the four math sets
    --suite dialogue   train on two SGD domains; ID = their test dialogues; OOD = the held-out third domain

The benchmarks of each role are options (`--train-data`, `--id`, `--ood`, or `suite.train`, `suite.id`,
`suite.ood`); where the data comes from is `--data-dir` / `suite.paths` / `suite.hub` (tasks.data).
Validation (`suite.n_val`, 0 by default: none): that many problems of the training sets, drawn with
`suite.shuffle_seed` (the same for every run seed) and left out of training, evaluated as
`<suite>_val` with role VAL; the training sets are disjoint from the ID/OOD test benchmarks, so
is the validation split. `harness tune` selects on it.
Every benchmark's data is checked before a run writes anything; a benchmark that cannot be had is
an error naming it and the option that leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from harness.errors import HarnessError
from harness.seeding import numpy_rng
from tasks.base import SUITES, Benchmark, Problem, Suite
from tasks.data import BENCHMARKS, GRADERS, DataSources

MATH_EVAL = ("math500", "aime24", "amc23", "minerva")
SCIENCE_EVAL = ("gpqa", "hle", "simpleqa")
DIALOGUE_DOMAINS = ("life_services", "transportation_travel", "financial_services")


@dataclass
class ProtocolOptions:
    train: tuple[str, ...] = field(default=(), metadata={"doc": "training sets (comma list of benchmark names; --train-data)"})
    id: tuple[str, ...] = field(default=(), metadata={"doc": "in-domain benchmarks (--id)"})
    ood: tuple[str, ...] = field(default=(), metadata={"doc": "out-of-domain benchmarks (--ood; empty: none)"})
    data_dir: str = field(default="", metadata={"doc": "a folder laid out like shared/data (default: $HARNESS_DATA_DIR, else the hub; --data-dir)"})  # a folder laid out like ../shared/data (default: $HARNESS_DATA_DIR, else the hub)
    paths: tuple[str, ...] = field(default=(), metadata={"doc": "NAME=FILE per benchmark (comma list)"})  # NAME=FILE per benchmark
    hub: tuple[str, ...] = field(default=(), metadata={"doc": "NAME=HUB_ID per benchmark (comma list; a local dataset folder works too)"})  # NAME=HUB_ID per benchmark (a local dataset folder works too)
    n_train: int = field(default=0, metadata={"doc": "a seeded subset of this many training problems (0: all)"})  # 0: every training problem; else a seeded subset of this size
    n_val: int = field(default=0, metadata={"doc": "validation problems held out of the training sets, evaluated as <suite>_val (role VAL; 0: none)"})
    shuffle_seed: int = field(default=0, metadata={"doc": "seed of the option shuffles (GPQA), fixed so every run sees the same prompts"})  # fixes option shuffles (GPQA) so every run sees the same prompts

    def validate(self) -> None:
        for role in ("train", "id", "ood"):
            names = getattr(self, role)
            if role != "ood" and not names:
                raise HarnessError(f"suite.{role} needs at least one benchmark (valid: {', '.join(BENCHMARKS.names())})")
            for name in names:
                BENCHMARKS.get(name)
            if len(set(names)) != len(names):
                raise HarnessError(f"suite.{role} lists a benchmark twice: {','.join(names)}")
        both = set(self.id) & set(self.ood)
        if both:
            raise HarnessError(f"benchmark(s) {', '.join(sorted(both))} are both ID and OOD; choose one role")
        if self.n_train < 0 or self.n_val < 0:
            raise HarnessError(f"suite.n_train and suite.n_val must be >= 0 (0: all / none), got {self.n_train}, {self.n_val}")
        DataSources.from_options(self.data_dir, self.paths, self.hub)  # checks the folder and NAME=VALUE lists


class ProtocolSuite(Suite):
    """A suite whose training set and ID/OOD benchmarks are named `BenchmarkSpec`s."""

    # Generation length and batch for real models, sized so that a few steps of a 135M model run on
    # a CPU; the CLI applies them under any --set the user gives (raise them on a GPU).
    run_defaults: ClassVar[dict[str, str]] = {}
    validation_option = "n_val"

    def __init__(self, options: ProtocolOptions, seed: int):
        super().__init__(options, seed)
        self.sources = DataSources.from_options(options.data_dir, options.paths, options.hub)
        self._train: list[Problem] | None = None
        self._val: list[Problem] = []
        self._benchmarks: list[Benchmark] | None = None

    @classmethod
    def check_data(cls, options: ProtocolOptions) -> None:
        """Raise before anything is written when some benchmark's data cannot be had."""
        sources = DataSources.from_options(options.data_dir, options.paths, options.hub)
        for role, flag in (("train", "--train-data"), ("ID", "--id"), ("OOD", "--ood")):
            names = getattr(options, role.lower())
            for name in names:
                others = [n for n in names if n != name]
                leave_out = f"{flag} {','.join(others)}" if others else f"{flag} naming other benchmarks"
                sources.check(BENCHMARKS.get(name), role, leave_out)

    def train_problems(self) -> list[Problem]:
        if self._train is None:
            problems = [p for name in self.options.train for p in self.load(name)]
            if self.options.n_val:
                if self.options.n_val >= len(problems):
                    raise HarnessError(f"suite.n_val={self.options.n_val} leaves no training problem (the training "
                                       f"sets hold {len(problems)})")
                order = numpy_rng(self.options.shuffle_seed, "suite-data", self.name, "validation").permutation(len(problems))
                held = set(order[: self.options.n_val].tolist())
                self._val = [p for i, p in enumerate(problems) if i in held]
                problems = [p for i, p in enumerate(problems) if i not in held]
            if self.options.n_train and self.options.n_train < len(problems):
                order = numpy_rng(self.seed, "suite-data", self.name, "n_train").permutation(len(problems))
                problems = [problems[i] for i in sorted(order[: self.options.n_train])]
            self._train = problems
        return self._train

    def eval_benchmarks(self) -> list[Benchmark]:
        if self._benchmarks is None:
            self._benchmarks = [
                Benchmark(name, role, self.load(name), GRADERS.get(BENCHMARKS.get(name).grader).name,
                          template=BENCHMARKS.get(name).template)
                for role, names in (("ID", self.options.id), ("OOD", self.options.ood)) for name in names
            ]
            if self.options.n_val and self.train_problems() and self._val:
                spec = BENCHMARKS.get(self.options.train[0])
                self._benchmarks.append(Benchmark(f"{self.name}_val", "VAL", self._val,
                                                  GRADERS.get(spec.grader).name, template=spec.template))
        return self._benchmarks

    def load(self, name: str) -> list[Problem]:
        return self.sources.problems(BENCHMARKS.get(name), self.options.shuffle_seed)

    def grade(self, response: str, problem: Problem) -> float:
        return GRADERS.get(problem.meta["grader"]).grade(response, problem)

    def extract_answer(self, response: str) -> str | None:
        """The answer a response gives, read by the grader of the training data (pseudo-label votes)."""
        return GRADERS.get(BENCHMARKS.get(self.options.train[0]).grader).extract(response)

    def answer_correct(self, answer: str, problem: Problem) -> bool:
        """The problem's grader scores the answer, written as a response it reads (`Grader.render`), 1."""
        grader = GRADERS.get(problem.meta["grader"])
        return grader.grade(grader.render(answer) if grader.render else answer, problem) >= 1.0

    def sft_target(self, problem: Problem) -> str:
        return problem.meta.get("target", problem.answer)


@dataclass
class MathOptions(ProtocolOptions):
    train: tuple[str, ...] = field(default=("math_train",), metadata={"doc": "training sets (comma list of benchmark names; --train-data)"})
    id: tuple[str, ...] = field(default=MATH_EVAL, metadata={"doc": "in-domain benchmarks (--id)"})
    ood: tuple[str, ...] = field(default=SCIENCE_EVAL, metadata={"doc": "out-of-domain benchmarks (--ood; empty: none)"})


@SUITES.register("math")
class MathSuite(ProtocolSuite):
    name = "math"
    description = "train MATH (answers); ID MATH500/AIME24/AMC23/Minerva; OOD GPQA/HLE/SimpleQA (math-verify)"
    Options = MathOptions
    run_defaults = {"train.max_new_tokens": "256", "train.prompts_per_step": "4", "model.max_positions": "1024"}


@dataclass
class ScienceOptions(ProtocolOptions):
    train: tuple[str, ...] = field(default=("simpleqa_train",), metadata={"doc": "training sets (comma list of benchmark names; --train-data)"})
    id: tuple[str, ...] = field(default=SCIENCE_EVAL, metadata={"doc": "in-domain benchmarks (--id)"})
    ood: tuple[str, ...] = field(default=MATH_EVAL, metadata={"doc": "out-of-domain benchmarks (--ood; empty: none)"})


@SUITES.register("science")
class ScienceSuite(ProtocolSuite):
    name = "science"
    description = "train SimpleQA (80% part); ID GPQA/HLE/SimpleQA (20% part); OOD the four math sets"
    Options = ScienceOptions
    run_defaults = {"train.max_new_tokens": "64", "train.prompts_per_step": "4", "model.max_positions": "1024"}


@dataclass
class DialogueOptions(ProtocolOptions):
    train: tuple[str, ...] = field(default=("sgd_life_services_train", "sgd_transportation_travel_train"), metadata={"doc": "training sets (comma list of benchmark names; --train-data)"})
    id: tuple[str, ...] = field(default=("sgd_life_services", "sgd_transportation_travel"), metadata={"doc": "in-domain benchmarks (--id)"})
    ood: tuple[str, ...] = field(default=("sgd_financial_services",), metadata={"doc": "out-of-domain benchmarks (--ood; empty: none)"})
    heldout: str = field(default="", metadata={"doc": "a dialogue domain: train and ID on the other two, OOD on it (overrides train/id/ood)"})  # a domain name: train and ID on the other two, OOD on it (overrides train/id/ood)

    def __post_init__(self):
        if self.heldout:
            self.apply_heldout()

    def apply_heldout(self) -> None:
        if self.heldout not in DIALOGUE_DOMAINS:
            raise HarnessError(f"suite.heldout must be one of {', '.join(DIALOGUE_DOMAINS)}, got {self.heldout!r}")
        kept = [d for d in DIALOGUE_DOMAINS if d != self.heldout]
        self.train = tuple(f"sgd_{d}_train" for d in kept)
        self.id = tuple(f"sgd_{d}" for d in kept)
        self.ood = (f"sgd_{self.heldout}",)

    def validate(self) -> None:
        if self.heldout:
            self.apply_heldout()
        super().validate()


@SUITES.register("dialogue")
class DialogueSuite(ProtocolSuite):
    name = "dialogue"
    description = "SGD next system action as JSON: train two domains, OOD the held-out third (suite.heldout)"
    Options = DialogueOptions
    run_defaults = {"train.max_new_tokens": "96", "train.prompts_per_step": "4", "model.max_positions": "2048"}

