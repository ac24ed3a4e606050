"""The training core: one cell (suite x algorithm x noise x seed), every algorithm alike.

    prompts (seeded order) -> rollout (G samples per prompt) -> clean reward (suite grader)
    -> noise injector -> training reward -> reference log-probs (if the algorithm needs them)
    -> critic forward (if it has one) -> algorithm.advantages -> update epochs
    (algorithm.actor_loss, algorithm.critic_loss) -> metrics line; ID/OOD evaluation with clean
    graders before the first step, every `eval_every` steps and at the end.

`Trainer.train_step` is the whole step in one function. `Trainer.run` trains a cell, saving a
checkpoint every `ckpt_every` steps and resuming from the cell's last checkpoint when there is one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from algorithms import ALGOS
from algorithms.base import Batch, PolicyForward
from algorithms.common import explained_variance, masked_mean, rollout_correction, rollout_mismatch
from harness import checkpoints, fast_llama, lora, precision, store
from harness.config import RunConfig, resolved_old_logp
from harness.critics import build_critic
from harness.models import load_policy, load_trained_policy
from harness.evaluation import PolicyEvaluator
from harness.metrics import PhaseTimer, summarise
from harness.rollout import forward_response, generate, merge_rollouts
from harness.seeding import epoch_order, seed_everything, torch_generator
from harness.tracking import Tracker
from noise import NoiseContext, parse_noise
from tasks import SUITES
from tasks.base import Problem


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """One cell's training; its ID/OOD evaluation is the `PolicyEvaluator` it holds (`self.evaluator`,
    harness.evaluation), which samples through whatever `self.rollout` is at the time."""

    # Where the modules are built before `distribute`: the cell's device; the sharded trainer builds
    # them in host memory and FSDP2 moves only each rank's shards to the device.
    build_on_cpu = False

    def __init__(self, cfg: RunConfig, cell: Path, cache_dir: Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.cell = Path(cell)
        self.progress = progress
        torch.set_num_threads(cfg.train.threads)
        self.device = cfg.train.device
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        precision.tf32(cfg.train.tf32, self.device)

        suite_cls = SUITES.get(cfg.suite)
        self.suite = suite_cls(cfg.suite_options, cfg.seed)
        algo_cls = ALGOS.get(cfg.algo)
        self.algo = algo_cls(cfg.algo_options)
        self.noise = parse_noise(cfg.noise)

        # The trained policy in its master dtype, or a frozen base with float32 LoRA adapters (load_trained_policy).
        self.lora = cfg.model.lora_rank > 0
        self.policy, self.tokenizer, self.peft = load_trained_policy(
            cfg, lambda dtype: self.build_policy(cache_dir, progress, dtype))
        # Before the reference and critic copies, which inherit the setting.
        self.fast_model = fast_llama.enable(self.policy, cfg.train.fast_model)
        # One process: the policy samples itself, under autocast in model.dtype when its masters differ.
        self.sample_dtype = precision.generation_dtype(cfg)
        if self.sample_dtype == next(self.policy.parameters()).dtype:
            self.sample_dtype = None
        self.rollout = precision.autocast_fn(functools.partial(generate, self.policy), self.device,
                                             self.sample_dtype)  # prompts -> Rollout
        self.old_logp_from_rollout = resolved_old_logp(cfg) == "rollout"
        self.vllm = None
        if cfg.train.rollout == "vllm":  # generation by vLLM; weights pushed after every update
            from harness.vllm_rollout import VLLMRollout

            self.vllm = VLLMRollout.for_policy(self.policy, cfg.model.dtype, cfg.seed, cache_dir, self.tokenizer)
            self.rollout = self.vllm.generate
        self.reference = None
        if self.algo.needs_reference() and not self.lora:  # under LoRA: the policy with its adapters off
            # Frozen: in model.dtype (a no-op copy's cast when the masters are in it already)
            self.reference = copy.deepcopy(self.policy).to(precision.generation_dtype(cfg)).requires_grad_(False).eval()
        seed_everything(cfg.seed, "heads-init")
        t = cfg.train
        self.critic = None
        if self.algo.critic != "none" and self.lora and t.critic_backbone == "separate":
            self.critic = lora.build_critic(self.algo.critic, self.peft, self.policy, self.algo.critic_options(),
                                            cfg.model)
        elif self.algo.critic != "none":
            self.critic = build_critic(self.algo.critic, self.policy, self.algo.critic_options(),
                                       shared=t.critic_backbone == "shared")
        # A shared critic is its head on the policy's backbone: the head joins the actor's optimiser
        # and the critic loss joins the actor loss (`update`).
        self.shared_critic = self.critic is not None and t.critic_backbone == "shared"
        self.heads = nn.ModuleDict(self.algo.extra_heads(self.policy.config.hidden_size)).to(self.device)
        self.autocast_dtype = None  # the trained modules' autocast dtype (one process; `distribute` sets it)
        self.distribute()  # before the optimisers: sharding replaces the parameters
        precision.check_master({"policy": self.policy, "critic": self.critic, "extra heads": self.heads}, cfg)

        policy_params = (lora.adapter_parameters(self.policy, lora.POLICY_ADAPTER) if self.lora
                         else list(self.policy.parameters()))
        groups = [{"params": policy_params}]
        if len(self.heads):
            groups.append({"params": list(self.heads.parameters()), "lr": t.lr * self.algo.heads_lr_scale()})
        if self.shared_critic:
            groups.append({"params": list(self.critic.head.parameters()), "lr": t.critic_lr})
        self.actor_params = [p for group in groups for p in group["params"]]
        # fused: one kernel for all parameters; the same update as the per-parameter loop, 4x faster here
        self.actor_opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        self.critic_opt = None
        if self.critic is not None and not self.shared_critic:
            self.critic_params = lora.trained_parameters(self.critic) if self.lora else list(self.critic.parameters())
            self.critic_opt = torch.optim.AdamW(self.critic_params, lr=t.critic_lr, weight_decay=t.weight_decay,
                                                fused=True)

        self.train_set = self.suite.train_problems()
        # `self.rollout` looked up at each call: the sharded trainer replaces it after this constructor
        self.evaluator = PolicyEvaluator(cfg, self.suite, self.tokenizer, lambda *a, **k: self.rollout(*a, **k),
                                         self.suite.eval_benchmarks())
        self.step = 0  # the step in progress (or the last one done); a failed cell reports it
        self.start_step = 0
        self.resumed_summary: dict[str, float] = {}
        self.tracker = Tracker()  # the grid sets the cell's tracked runs (--log-to)

    def encode(self, problem: Problem) -> list[int]:
        """A problem's prompt token ids (cached; the evaluator's cache serves training prompts too)."""
        return self.evaluator.encode(problem)

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.evaluator.decode(responses, mask)

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        """The evaluator's rows at `step` (`PolicyEvaluator.evaluate`)."""
        return self.evaluator.evaluate(step)

    @property
    def eval_responses(self) -> list[dict[str, Any]] | None:
        """The evaluator's list of graded responses (None, the default: not collected)."""
        return self.evaluator.eval_responses

    @eval_responses.setter
    def eval_responses(self, rows: list[dict[str, Any]] | None) -> None:
        self.evaluator.eval_responses = rows

    # ---- data -------------------------------------------------------------------------------

    def step_problems(self, step: int) -> list[Problem]:
        """The prompts of a step: a seeded permutation per epoch over the train split."""
        n, k = len(self.train_set), self.cfg.train.prompts_per_step
        return [self.train_set[epoch_order(self.cfg.seed, n, epoch)[pos]]
                for epoch, pos in (divmod(i, n) for i in range((step - 1) * k, step * k))]

    def extra_problems(self, step: int, round_: int) -> list[Problem]:
        """Fresh prompts for dynamic-sampling round `round_` >= 1 of `step`: a seeded draw of its own
        stream per (step, round), so the regular data order of later steps does not shift."""
        n, k = len(self.train_set), self.cfg.train.prompts_per_step
        order = torch.randperm(n, generator=torch_generator(self.cfg.seed, "dynamic-sampling", step, round_))
        return [self.train_set[int(order[i % n])] for i in range(k)]

    # ---- the training step ------------------------------------------------------------------

    def sample_groups(self, problems: list[Problem], step: int, round_: int, timer: "PhaseTimer"):
        """Roll out G samples for each problem; grade them; apply the noise. Round 0 is the step's
        regular sampling; rounds >= 1 (dynamic sampling) have their own rollout and noise streams."""
        t, G = self.cfg.train, self.cfg.train.group_size
        repeated = [p for p in problems for _ in range(G)]
        with timer("rollout"):
            stream = ("rollout", step) if round_ == 0 else ("rollout", step, "round", round_)
            roll = self.rollout(
                [self.encode(p) for p in repeated], max_new_tokens=t.max_new_tokens,
                eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                temperature=t.temperature, top_p=t.top_p, generator=torch_generator(self.cfg.seed, *stream),
            )
            texts = self.decode(roll.responses, roll.response_mask)
        with timer("reward"):
            clean = torch.tensor([self.suite.grade(text, p) for text, p in zip(texts, repeated)], dtype=torch.float32)
        with timer("noise"):
            ctx = NoiseContext(seed=self.cfg.seed, step=step, prompt_ids=[p.id for p in repeated],
                               sample_idx=[round_ * G + k for k in range(G)] * len(problems),
                               response_lengths=roll.response_mask.sum(-1).long().tolist(), max_length=t.max_new_tokens,
                               regrade=lambda i, gold: self.suite.grade(texts[i], dataclasses.replace(repeated[i], answer=gold)),
                               responses=texts, golds=[p.answer for p in repeated], extract=self.suite.extract_answer)
            scores, noise_stats = self.noise.apply(clean, ctx)
        return roll, clean, scores, noise_stats

    def dynamic_sampling(self, first, step: int, timer: "PhaseTimer"):
        """Keep the groups `algo.keep_groups` accepts, rolling out up to `algo.extra_sampling_rounds()`
        more rounds until `prompts_per_step` groups are kept (surplus groups are dropped in draw
        order). Too few after the last round: train on those kept; none at all: keep the first
        round whole (its group advantages are zero)."""
        t, G = self.cfg.train, self.cfg.train.group_size
        parts, n_kept, drawn, sample = [], 0, 0, first
        for round_ in range(self.algo.extra_sampling_rounds() + 1):
            if round_ > 0:
                sample = self.sample_groups(self.extra_problems(step, round_), step, round_, timer)
            roll, clean, scores, _ = sample
            keep = self.algo.keep_groups(scores.view(-1, G))
            drawn += keep.numel()
            groups = keep.nonzero().squeeze(-1)[: t.prompts_per_step - n_kept]
            if groups.numel():
                rows = (groups.unsqueeze(-1) * G + torch.arange(G)).flatten()
                parts.append((roll, clean[rows], scores[rows], rows))
                n_kept += groups.numel()
            if n_kept == t.prompts_per_step:
                break
        metrics = {"sampling/rounds": round_ + 1, "sampling/groups_drawn": drawn, "sampling/groups_kept": n_kept}
        if not parts:
            roll, clean, scores, _ = first
            parts = [(roll, clean, scores, torch.arange(clean.numel()))]
        roll = merge_rollouts([(r, rows) for r, _, _, rows in parts], self.tokenizer.pad_token_id)
        clean = torch.cat([c for _, c, _, _ in parts])
        scores = torch.cat([s for _, _, s, _ in parts])
        return roll, clean, scores, metrics

    def train_step(self, step: int) -> dict[str, Any]:
        t = self.cfg.train
        timer = PhaseTimer()
        first = self.sample_groups(self.step_problems(step), step, 0, timer)
        roll, clean, scores, noise_stats = first
        # Reward and noise metrics describe the step's regular prompts, whatever is kept below.
        reward_metrics = {"reward/clean_mean": float(clean.mean()), "reward/train_mean": float(scores.mean()),
                          **noise_stats}
        sampling_metrics: dict[str, float] = {}
        if self.algo.keep_groups(scores.view(-1, t.group_size)) is not None:
            roll, clean, scores, sampling_metrics = self.dynamic_sampling(first, step, timer)
        mask = roll.response_mask
        group_ids = torch.arange(mask.shape[0] // t.group_size).repeat_interleave(t.group_size)

        batch = Batch(
            input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
            response_mask=mask, scores=scores.to(self.device), clean_scores=clean.to(self.device),
            group_ids=group_ids.to(self.device), prompt_len=roll.prompt_len,
        )
        minibatches = self.minibatches(batch.size, step)
        # The policy is unchanged until the first optimiser step, so the first minibatch's forward (with
        # gradients, needed by the update anyway) also gives those rows' old log-probs; only the other
        # rows need a no-grad forward. Same function, same weights: the same values as a full forward.
        with timer("update"):
            first_fwd = self.policy_forward(batch.select(minibatches[0]))
        mismatch: dict[str, float] = {}
        if self.old_logp_from_rollout:  # the sampler's log-probs: the same weights and function
            batch["old_logp"] = roll.logp
            if roll.logp is not None:  # the mismatch on the rows the trainer has scored already
                first = minibatches[0]
                mismatch = rollout_mismatch(first_fwd.logp.detach(), roll.logp[first], mask[first])
        else:
            with torch.no_grad(), timer("old_logp"):
                batch["old_logp"] = self.old_logp(batch, minibatches[0], first_fwd.logp.detach())
            if roll.logp is not None:
                mismatch = rollout_mismatch(batch["old_logp"], roll.logp, mask)
                if t.rollout_correction != "off":
                    batch["rollout_weight"], correction = rollout_correction(
                        batch["old_logp"], roll.logp, mask, t.rollout_correction, t.rollout_is_cap,
                        t.rollout_mask_low, t.rollout_mask_high)
                    mismatch.update(correction)
        # Frozen passes run under inference mode (no autograd bookkeeping); their results are copied out.
        if self.algo.needs_reference():
            with timer("reference"), torch.inference_mode(), self.reference_context():
                ref_logp, _, _ = self.response_forward(self.reference_model(), roll.input_ids, roll.attention_mask,
                                                       roll.prompt_len)
            batch["ref_logp"] = ref_logp.clone()
        if self.critic is not None:
            with timer("critic"), torch.inference_mode():
                old_values = self.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
            batch["old_values"] = old_values.clone()
        with torch.no_grad():
            with timer("advantages"):
                adv_metrics = self.algo.advantages(batch)

        with timer("update"):
            update_metrics = self.update(batch, step, minibatches, first_fwd)
        if self.vllm is not None:
            with timer("weight_sync"):
                self.vllm.sync_weights(self.policy)

        n_tokens = float(mask.sum())
        metrics: dict[str, Any] = {
            "step": step,
            **reward_metrics,
            **sampling_metrics,
            **mismatch,
            "response/length_mean": n_tokens / mask.shape[0],
            **adv_metrics,
            **update_metrics,
        }
        if "ref_logp" in batch:
            metrics["actor/kl_ref"] = float(masked_mean(batch["old_logp"] - batch["ref_logp"], mask))
        if "returns" in batch and "old_values" in batch and batch["old_values"].dim() == 2:
            metrics["critic/explained_var"] = float(explained_variance(batch["old_values"], batch["returns"], mask))
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        metrics["time/step"] = sum(timer.seconds.values())
        metrics["throughput/tokens_per_s"] = n_tokens / max(timer.seconds["rollout"], 1e-9)
        return metrics

    @torch.no_grad()
    def label_votes(self, k: int) -> dict[str, list[tuple[str | None, float]]]:
        """k samples of the current (initial) policy for each train problem that steps 1..train.steps
        draw: problem id -> k `Suite.vote` pairs (the answer as the grader reads it or None, 1.0 when it
        equals the gold answer), for pseudo-label noise."""
        t = self.cfg.train
        drawn = {p.id: p for step in range(1, t.steps + 1) for p in self.step_problems(step)}
        repeated = [p for p in drawn.values() for _ in range(k)]
        gen = torch_generator(self.cfg.seed, "pseudo-label")
        votes: dict[str, list[tuple[str | None, float]]] = {}
        for start in range(0, len(repeated), t.prompts_per_step * t.group_size):
            chunk = repeated[start:start + t.prompts_per_step * t.group_size]
            with precision.autocast(self.device, self.sample_dtype):
                roll = generate(self.policy, [self.encode(p) for p in chunk], max_new_tokens=t.max_new_tokens,
                                eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                                temperature=t.temperature, top_p=t.top_p, generator=gen)
            for text, p in zip(self.decode(roll.responses, roll.response_mask), chunk):
                votes.setdefault(p.id, []).append(self.suite.vote(text, p))
        return votes

    def minibatches(self, size: int, step: int) -> list[torch.Tensor]:
        """Row indices of each minibatch, every epoch in order: a seeded permutation per epoch, chunked."""
        t = self.cfg.train
        out = []
        for epoch in range(t.ppo_epochs):
            order = torch.randperm(size, generator=torch_generator(self.cfg.seed, "minibatch", step, epoch))
            out += [index.to(self.device) for index in order.chunk(t.num_minibatches)]
        return out

    def build_policy(self, cache_dir: Path | None, progress: bool, dtype: str):
        """The policy model and its tokenizer, with its weights, in `dtype` (the sharded trainer builds it
        on the meta device and loads the weights after sharding)."""
        return load_policy(self.cfg.model, self.suite, self.cfg.seed, cache_dir,
                           "cpu" if self.build_on_cpu else self.device, progress, dtype=dtype)

    def distribute(self) -> None:
        """Hook between building the modules and their optimisers; the sharded trainer
        (`harness.sharded`) shards the modules here. One process: under `train.mixed_precision=bf16`
        the policy's and the critic backbone's forwards run under autocast (their backwards follow);
        the heads cast their inputs to float32 and compute in it."""
        self.autocast_dtype = precision.compute_dtype(self.cfg.train)
        if self.critic is not None and self.autocast_dtype is not None:
            self.critic.states = precision.autocast_fn(self.critic.states, self.device, self.autocast_dtype)

    def response_forward(self, model, input_ids, attention_mask, prompt_len: int, **kwargs):
        """`forward_response` at the rollout temperature (the sharded trainer splits its rows across ranks),
        under the one-process autocast of mixed precision."""
        with precision.autocast(self.device, self.autocast_dtype):
            return forward_response(model, input_ids, attention_mask, prompt_len, self.cfg.train.temperature, **kwargs)

    def reference_model(self) -> nn.Module:
        """The frozen reference: its own copy, or under LoRA the policy (run in `reference_context`)."""
        return self.policy if self.lora else self.reference

    def reference_context(self):
        """Under LoRA the reference is the base model: the policy with every adapter disabled."""
        return self.peft.disable_adapter() if self.lora else contextlib.nullcontext()

    def critic_adapter(self):
        """A LoRA critic's adapter active on the shared base (harness.lora); otherwise nothing to switch."""
        if isinstance(self.critic, lora.LoraCritic):
            return lora.use_adapter(self.peft, lora.CRITIC_ADAPTER)
        return contextlib.nullcontext()

    def policy_forward(self, mb: Batch) -> PolicyForward:
        logp, entropy, hidden = self.response_forward(self.policy, mb["input_ids"], mb["attention_mask"], mb.prompt_len,
                                                      want_hidden=self.algo.needs_hidden,
                                                      entropy_grad=self.algo.entropy_needs_grad())
        return PolicyForward(logp, entropy, hidden)

    @torch.no_grad()
    def old_logp(self, batch: Batch, first: torch.Tensor, first_logp: torch.Tensor) -> torch.Tensor:
        """Behaviour log-probs `[B, T]`: rows `first` from `first_logp`, the others from a no-grad forward."""
        old = torch.empty_like(batch["response_mask"], dtype=first_logp.dtype)
        old[first] = first_logp
        rest = torch.ones(batch.size, dtype=torch.bool, device=old.device)
        rest[first] = False
        if rest.any():
            rows = rest.nonzero().squeeze(-1)
            old[rows] = self.policy_forward(batch.select(rows)).logp
        return old

    def update(self, batch: Batch, step: int, minibatches: list[torch.Tensor] | None = None,
               first_fwd: PolicyForward | None = None) -> dict[str, float]:
        """One optimiser step per minibatch; `first_fwd`, when given, is the policy's forward on the first one."""
        minibatches = self.minibatches(batch.size, step) if minibatches is None else minibatches
        sums: dict[str, float] = {}
        for i, index in enumerate(minibatches):
            mb = batch.select(index)
            critic_generator = torch_generator(self.cfg.seed, "critic-loss", step, i)  # the critic loss's draws
            fwd = first_fwd if i == 0 and first_fwd is not None else self.policy_forward(mb)
            loss, metrics = self.algo.actor_loss(mb, fwd, self.heads)
            metrics["actor/entropy"] = float(masked_mean(fwd.entropy.detach(), mb["response_mask"]))
            if self.shared_critic:  # one backward through the shared backbone, one optimiser step
                closs, cmetrics = self.algo.critic_loss(mb, self.critic, critic_generator)
                loss = loss + self.cfg.train.critic_coef * closs
                metrics.update(cmetrics)
            metrics["actor/grad_norm"] = self.optimise(loss, self.actor_opt, self.actor_params,
                                                       "actor+critic" if self.shared_critic else "actor", step)
            if self.critic_opt is not None:
                with self.critic_adapter():  # its backward too: checkpointing recomputes with the active adapter
                    closs, cmetrics = self.algo.critic_loss(mb, self.critic, critic_generator)
                    cmetrics["critic/grad_norm"] = self.optimise(closs, self.critic_opt, self.critic_params, "critic", step)
                metrics.update(cmetrics)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(minibatches) for k, v in sums.items()}

    def optimise(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: list, which: str, step: int) -> float:
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite {which} loss ({float(loss.detach())}) at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        if not torch.isfinite(norm):
            raise NonFiniteLoss(f"non-finite {which} gradient norm at step {step}")
        opt.step()
        return float(norm)

    # ---- the cell ---------------------------------------------------------------------------

    def run(self, ckpt_every: int = 0, resume: Path | str | None = "latest") -> dict[str, Any]:
        """Train for `train.steps`, evaluating at 0, every `eval_every` steps and at the end.

        Resumes from the checkpoint folder `resume` (None: none; "latest": the cell's newest one
        that passes verification), `self.start_step` tells from where; saves one every
        `ckpt_every` steps (0: never). `self.step` is the step in progress."""
        t = self.cfg.train
        metrics_path, eval_path = self.cell / "metrics.jsonl", self.cell / "eval.jsonl"
        if k := self.noise.needs_labels():  # pseudo-labels come from the initial policy: before any restore
            self.noise.set_labels(self.label_votes(k))
        if resume == "latest":
            self.start_step = self.restore_latest()
        else:
            self.start_step = self.restore_checkpoint(Path(resume)) if resume is not None else 0
        if self.start_step == 0:
            rows = self.evaluate(0)
            self.write_rows(eval_path, rows)
            self.tracker.log_eval(0, rows)
            summary = summarise(rows)
        else:
            summary = self.resumed_summary
        bar = tqdm(range(self.start_step + 1, t.steps + 1), desc=f"{self.cfg.algo}/{self.cfg.noise}/seed{self.cfg.seed}",
                   leave=False, disable=not self.progress, initial=self.start_step, total=t.steps)
        for step in bar:
            self.step = step
            metrics = self.train_step(step)
            if step % t.eval_every == 0 or step == t.steps:
                rows = self.evaluate(step)
                self.write_rows(eval_path, rows)
                self.tracker.log_eval(step, rows)
                summary = summarise(rows)
                metrics.update({f"eval/{k}": v for k, v in summary.items()})
            self.write_rows(metrics_path, [metrics])
            self.tracker.log_metrics(step, metrics)
            if ckpt_every and step % ckpt_every == 0:
                self.save_checkpoint(step, summary)
            bar.set_postfix(reward=f"{metrics['reward/clean_mean']:.2f}",
                            **{k: f"{v:.2f}" for k, v in summary.items()})
        return {"final_step": t.steps, **summary}

    def write_rows(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """Append to a JSONL file of the cell (under sharding only rank 0 writes)."""
        store.append_jsonl(path, rows)

    # ---- checkpoints ------------------------------------------------------------------------

    # The single-process checkpoint: `ckpt/step<k>/state.pt` and its `manifest.json` (store.py).

    def save_checkpoint(self, step: int, summary: dict[str, float]) -> None:
        """Atomically write `ckpt/step<k>/` (then drop all but it and the one before): state.pt and
        the manifest with its checksum and the byte lengths and checksums of metrics.jsonl and
        eval.jsonl, so a resume verifies them and cuts off lines written after it."""
        checkpoints.write_checkpoint(self.cell, step, {"step": step, "summary": summary, "config": self.cfg.to_dict(),
                                                       **checkpoints.trainer_state(self)})

    def restore_checkpoint(self, folder: Path) -> int:
        """Load the checkpoint in `folder` (verified by `checkpoints.verify_checkpoint`), truncate the
        JSONL files to it; return its step. A state that does not load with weights_only=True
        (anything but tensors and plain data: it could run code) is refused with a HarnessError."""
        manifest = checkpoints.verify_checkpoint(self.cell, folder)
        self.resumed_summary = checkpoints.load_checkpoint(self.cell, folder, manifest,
                                                           lambda state: checkpoints.load_trainer_state(self, state))
        self.step = manifest["step"]
        return manifest["step"]

    def restore_latest(self) -> int:
        """Restore the cell's newest checkpoint that passes verification; its step (0: none)."""
        found = checkpoints.usable_checkpoint(self.cell)
        return self.restore_checkpoint(found[1]) if found else 0
