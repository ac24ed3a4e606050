"""DFPO: a flow-matching distributional critic for PPO (spec §1, open questions §9 #1-10).

Everything about DFPO's internals is an [I] reconstruction in the spec; every choice below is a
field of `DFPOOptions` with the spec's default. The flow critic is `algorithms.flow_critic`; this
module holds the algorithm:

- the flow critic head `FlowHead` (registered as critic kind "flow"): a velocity field
  v(z, tau, h_t) over virtual time tau in [0, 1], N(0, 1) base noise, one Euler step at inference
  (`algorithms.flow_critic`);
- coupled-noise distributional GAE targets (§1.4, `algorithms.flow_critic`);
- the critic loss `flow_critic_loss` (§1.5, `algorithms.flow_critic`): uncertainty-weighted
  distributional CFM, bootstrapped anchor, geometric consistency, lower-tail conditional value risk,
  tail shape;
- the mean-based advantage, risk-adjusted by `risk_adv_weight` (below; the spec's own §1.6 variant is
  `risk_eta`), and the PPO-clip actor (§1.6);
- diagnostics: spread and tails of the predicted distribution, explained variance, flow
  straightness, CRPS and 10-90% coverage against realised returns.

The risk that reaches the policy [I, design default; spec §1.6 and §9 #9 leave open whether DFPO's
advantage is risk-adjusted]. The risk and tail-shape terms of the critic loss are unchanged when all
samples of a token shift together, so they move no token's mean and an advantage on the mean cannot see
them (tests/test_risk.py). The risk-adjusted advantage reads the flow's lower-tail spread
g = mean - CVaR-_alpha of the M samples itself (`risk_adv_mode`): `tail_td` (default) shrinks the TD
errors below -g by 1 - w (`algorithms.common.tail_dampened_gae`, "dampen noisy negative deviations"),
`value` runs GAE on V_w = mean - w g. w = 0 is plain GAE on the mean, bit for bit. The default and why:
README, "The risk that reaches the policy". Logged every step: `actor/adv_corr_plain_gae` and
`critic/grad_share/<term>` (each weighted term's share of the gradient at the head's velocity outputs).

Two decisions go beyond the spec's text:

- `cfm_coupling`: with target samples paired to independent base noise, the CFM-optimal velocity
  at tau = 0 is E[Z] - z, so the *one-step* Euler sample collapses onto the mean. The default pairs
  the M base-noise draws with the M target samples of a token by rank (the 1-D optimal-transport
  coupling), which makes the marginal flow straight and the one-step map the quantile map;
  `cfm_coupling=independent` is the literal reading.
- The critic's M samples per token (its output, the value V-bar = their mean, the coupled-noise
  GAE targets, the anchor's clip, the tail terms) come from M fixed noise levels, the normal
  quantiles eps_j = Phi^-1((j - 1/2) / M) (`noise_levels`), not from random draws: V-bar is then a
  midpoint rule for E[Z] instead of a Monte-Carlo mean, two critic passes on a batch give the same
  advantages, and the anchor compares new and old values at the same levels. Random draws remain
  where the flow is trained (the CFM and BCFM base noise and times, the consistency term's times),
  from the generator the trainer passes to `critic_loss`, keyed by (seed, step, minibatch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from algorithms.base import Batch, register, register_variant
from algorithms.common import (RISK_ADV_MODES, explained_variance, gae, masked_corr, masked_mean, masked_whiten,
                               risk_adjusted_gae)
from algorithms.distributional import crps, cvar_lower, cvar_upper, interval_coverage, lower_tail_gap, reward_std_cap
from algorithms.flow_critic import (ANCHOR_MODES, COUPLINGS, WEIGHT_MODES, coupled_gae, flow_critic_loss,
                                    realised_returns)
from algorithms.ppo import PPO, PPOOptions
from algorithms.search import Uniform
from harness.errors import HarnessError

RISK_ADV_WEIGHT = 1.0  # the defaults of the risk-adjusted advantage (module docstring; why: README)
RISK_ADV_MODE = "tail_td"

# ---- the algorithm ----


@dataclass
class DFPOOptions(PPOOptions):
    """PPO's options (same names, so `algo.KEY` reaches both; KL in the reward at 0.05 as the PPO
    baseline, spec §9 #10) plus the flow critic's. Defaults are the spec's [I] choices (§1.8, §9)."""

    # flow head (spec §1.3, §9 #2)
    flow_width: int = field(default=1024, metadata={"doc": "flow head MLP width"})
    flow_layers: int = field(default=3, metadata={"doc": "flow head MLP blocks"})
    time_embed_dim: int = field(default=128, metadata={"doc": "flow time embedding size"})
    n_samples: int = field(default=16, metadata={"doc": "coupled flow samples per token (M)"})  # M, coupled samples per token
    consistency_steps: int = field(default=4, metadata={"doc": "Euler steps K of the consistency term and straightness gap"})  # K Euler steps for the consistency term and the straightness gap
    return_clip: Optional[float] = field(default=10.0, metadata={"doc": "clip flow targets to [-c, c] (none: off)"})  # clip targets to [-c, c] before CFM (spec §1.3 "Scale"); None: off
    # 1. uncertainty-weighted distributional CFM (§1.5.1, §9 #4)
    use_cfm: bool = field(default=True, metadata={"doc": "use the uncertainty-weighted distributional CFM loss"})
    cfm_weight: float = field(default=1.0, metadata={"doc": "weight of the CFM loss"})
    weight_mode: str = field(default="value_flows", metadata={"doc": "CFM uncertainty weight: value_flows, inverse_cov or none"})
    kappa: float = field(default=0.3, metadata={"doc": "temperature of the uncertainty weight"})
    cov_c: float = field(default=1.0, metadata={"doc": "constant c of the inverse_cov weight"})  # the constant c of the inverse_cov weight
    cfm_coupling: str = field(default="sorted", metadata={"doc": "noise-target pairing: sorted or independent"})  # rank-pairing of noise and targets; "independent": collapsed one-step samples
    # 2. bootstrapped anchor (§1.5.2, §9 #5); the mean anchor clips with PPO's `value_clip`
    use_anchor: bool = field(default=True, metadata={"doc": "use the bootstrapped anchor loss"})
    anchor_weight: float = field(default=0.5, metadata={"doc": "weight of the anchor loss"})
    anchor_mode: str = field(default="mean", metadata={"doc": "anchor: mean (clipped like the value loss) or bcfm"})  # or "bcfm": CFM toward r_t + gamma z_{t+1} of the old critic
    # 3. geometric consistency (§1.5.3, §9 #6)
    use_geo: bool = field(default=True, metadata={"doc": "use the geometric consistency loss"})
    geo_weight: float = field(default=0.1, metadata={"doc": "weight of the geometric consistency loss"})
    geo_endpoint: bool = field(default=False, metadata={"doc": "add the one-step vs K-step endpoint term"})  # add (z^1-step - sg(z^K-step))^2
    # 4. conditional value risk, lower tail (§1.5.4, §9 #7)
    use_risk: bool = field(default=True, metadata={"doc": "use the lower-tail conditional value risk term"})
    risk_weight: float = field(default=0.1, metadata={"doc": "weight of the risk term"})
    alpha: float = field(default=0.1, metadata={"doc": "CVaR level"})
    delta_low: float = field(default=0.0, metadata={"doc": "lower-tail threshold of the risk term"})
    # 5. tail shape: gain capped at delta_high, plus curvature (§1.5.5)
    use_shape: bool = field(default=True, metadata={"doc": "use the tail-shape term"})
    shape_weight: float = field(default=0.05, metadata={"doc": "weight of the tail-shape term"})
    delta_high: Optional[float] = field(default=None, metadata={"doc": "upper-tail cap (none: one std of the step's training rewards)"})  # None: one std of the step's training rewards (spec §9 #7)
    # advantage (§1.6, §9 #9): A - eta * (A - CVaR^-_alpha(A^(.))); 0 is mean-based
    risk_eta: float = field(default=0.0, metadata={"doc": "risk-aware advantage: A - eta (A - CVaR(A)) (0: mean-based)"})
    # the risk that reaches the policy (module docstring, README "The risk that reaches the policy")  [I]
    risk_adv_weight: float = field(default=RISK_ADV_WEIGHT, metadata={"doc": "weight w in [0, 1] of the risk-adjusted advantage (0: plain GAE on the flow mean); its form is risk_adv_mode"})
    risk_adv_mode: str = field(default=RISK_ADV_MODE, metadata={"doc": "risk-adjusted advantage: tail_td (TD errors below the flow's lower tail, mean - CVaR-_alpha, shrunk by 1 - w) or value (GAE on mean - w (mean - CVaR-_alpha))"})
    grad_shares: bool = field(default=True, metadata={"doc": "log each critic loss term's share of the gradient at the head's outputs (critic/grad_share/<term>)"})

    def validate(self) -> None:
        super().validate()
        positive = {"flow_width": self.flow_width, "flow_layers": self.flow_layers, "n_samples": self.n_samples,
                    "consistency_steps": self.consistency_steps, "time_embed_dim": self.time_embed_dim}
        for key, value in positive.items():
            if value < 1:
                raise HarnessError(f"dfpo.{key} must be a positive integer, got {value}")
        if self.n_samples < 2:
            raise HarnessError(f"dfpo.n_samples must be at least 2 (a distribution needs samples), got {self.n_samples}")
        if self.time_embed_dim % 2:
            raise HarnessError(f"dfpo.time_embed_dim must be even, got {self.time_embed_dim}")
        for key, valid in (("weight_mode", WEIGHT_MODES), ("anchor_mode", ANCHOR_MODES), ("cfm_coupling", COUPLINGS)):
            if getattr(self, key) not in valid:
                raise HarnessError(f"dfpo.{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if not 0 < self.alpha <= 0.5:
            raise HarnessError(f"dfpo.alpha must lie in (0, 0.5], got {self.alpha}")
        if not 0 <= self.risk_adv_weight <= 1:
            raise HarnessError(f"dfpo.risk_adv_weight must lie in [0, 1] (0: plain GAE on the mean), got {self.risk_adv_weight}")
        if self.risk_adv_mode not in RISK_ADV_MODES:
            raise HarnessError(f"dfpo.risk_adv_mode must be one of {', '.join(RISK_ADV_MODES)}, got {self.risk_adv_mode!r}")
        if not 0 <= self.risk_eta <= 1:
            raise HarnessError(f"dfpo.risk_eta must lie in [0, 1], got {self.risk_eta}")
        weights = {k: getattr(self, k) for k in ("cfm_weight", "anchor_weight", "geo_weight", "risk_weight",
                                                 "shape_weight", "kappa", "cov_c", "delta_low")}
        for key, value in weights.items():
            if value < 0:
                raise HarnessError(f"dfpo.{key} must be >= 0, got {value}")
        for key in ("return_clip", "delta_high"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise HarnessError(f"dfpo.{key} must be > 0 or none, got {getattr(self, key)}")
        if not (self.use_cfm or (self.use_anchor and self.anchor_mode == "bcfm")):
            raise HarnessError("dfpo needs a flow-matching term: keep use_cfm, or use_anchor with anchor_mode=bcfm")


@register
class DFPO(PPO):
    name = "dfpo"
    description = ("flow-matching distributional critic (one-step Euler samples, coupled-noise GAE), "
                   "CFM + anchor + geometric + CVaR risk + tail-shape critic loss, PPO-clip actor")
    paper = "Zhu et al. 2026 (DFPO, arXiv 2602.05890); critic after Value Flows (arXiv 2510.07650)"
    Options = DFPOOptions
    # harness tune: the weight of the risk-adjusted advantage, the knob through which the flow critic's
    # distribution reaches the policy (0: plain GAE on its mean)  [I]
    SEARCH_SPACE = {"algo.risk_adv_weight": Uniform(0.0, 1.0)}
    critic = "flow"

    def critic_options(self) -> dict:
        o = self.opts
        return {"width": o.flow_width, "layers": o.flow_layers, "time_dim": o.time_embed_dim, "n_samples": o.n_samples}

    def advantages(self, batch: Batch) -> dict[str, float]:
        o, mask = self.opts, batch["response_mask"]
        valid = mask.bool()
        rewards = self.token_rewards(batch)
        samples = batch["old_values"].float()  # [B, T, M] one-step samples of the old critic
        adv_samples, targets = coupled_gae(rewards, samples, mask, o.gamma, o.lam)
        value = samples.mean(-1)
        plain, returns = gae(rewards, value, mask, o.gamma, o.lam)  # GAE on the flow mean; R-hat
        adv = plain
        if o.return_clip is not None:
            targets, returns = targets.clamp(-o.return_clip, o.return_clip), returns.clamp(-o.return_clip, o.return_clip)
        if o.risk_adv_weight > 0:  # the critic still learns the mean; only the actor sees the risk
            adv = risk_adjusted_gae(rewards, value, lower_tail_gap(samples, o.alpha), mask, o.gamma, o.lam,
                                    o.risk_adv_weight, o.risk_adv_mode)
        if o.risk_eta > 0:
            adv = adv - o.risk_eta * (adv - cvar_lower(adv_samples, o.alpha))
        if o.whiten_advantages:
            adv = masked_whiten(adv, mask)
        batch["advantages"] = torch.where(valid, adv, torch.zeros_like(adv))
        batch["returns"] = torch.where(valid, returns, torch.zeros_like(returns))
        batch["dist_returns"] = targets
        if o.use_anchor and o.anchor_mode == "bcfm":
            td = coupled_gae(rewards, samples, mask, o.gamma, 0.0)[1]  # lam = 0: r_t + gamma z_{t+1}
            batch["td_returns"] = td if o.return_clip is None else td.clamp(-o.return_clip, o.return_clip)
        cap = o.delta_high if o.delta_high is not None else reward_std_cap(batch["scores"])
        batch["tail_cap"] = torch.full_like(batch["scores"], cap, dtype=torch.float32)

        realised = realised_returns(rewards, mask, o.gamma)
        z, g = samples[valid], realised[valid]  # [N, M], [N]
        return {
            "critic/returns_mean": float(masked_mean(returns, mask)),
            "actor/adv_corr_plain_gae": masked_corr(batch["advantages"], plain, mask),
            "critic/tail_cap": cap,
            # What a Monte-Carlo mean of M random one-step samples would scatter by (std_j z / sqrt(M)),
            # the noise the fixed levels keep out of V-bar and the advantages.
            "critic/value_mc_se": float((z.std(-1) / math.sqrt(z.shape[-1])).mean()),
            "critic/dist_mean": float(z.mean()),
            "critic/dist_std": float(z.std(-1).mean()),
            "critic/cvar_lower_gap": float((z.mean(-1) - cvar_lower(z, o.alpha)).mean()),
            "critic/cvar_upper_gap": float((cvar_upper(z, o.alpha) - z.mean(-1)).mean()),
            "critic/explained_var": float(explained_variance(value, returns, mask)),
            "critic/crps": float(crps(z, g).mean()),
            "critic/coverage_10_90": float(interval_coverage(z, g).mean()),
        }

    def critic_loss(self, mb: Batch, critic, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        valid = mb["response_mask"].bool()
        h = critic.states(mb["input_ids"], mb["attention_mask"], mb.prompt_len)[valid]  # [N, d]
        tokens = {"old_samples": mb["old_values"][valid].float(), "targets": mb["dist_returns"][valid],
                  "returns": mb["returns"][valid], "tail_cap": mb["tail_cap"].unsqueeze(-1).expand_as(valid)[valid]}
        if "td_returns" in mb:
            tokens["td_targets"] = mb["td_returns"][valid]
        return flow_critic_loss(critic.head, h, tokens, self.opts, generator)


# ---- ablations (the `ablations` preset): DFPO with its tail terms off, and with the risk-adjusted advantage off ----

DFPOTailsOff = register_variant(
    DFPO, "dfpo_tails_off", "DFPO ablation: the lower-tail risk and tail-shape critic terms off",
    use_risk=False, use_shape=False,
)
DFPORiskOff = register_variant(
    DFPO, "dfpo_risk_off", "DFPO ablation: the risk-adjusted advantage off (plain GAE on the flow mean)",
    risk_adv_weight=0.0, risk_eta=0.0,
)
