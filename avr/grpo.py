"""The RL objective: group-relative advantages, PPO-clip on text tokens, Flow-GRPO on image steps.

Advantages (GRPO, Shao et al. 2024): within each group of rollouts of one prompt,

    A_i = clip((r_i − mean_g r) / (std_g r + ε) , −c, c)      (no std division when `scale_std=False`)

so a group whose rewards are all equal gets A = 0 everywhere (no gradient, no NaN).

Text tokens (PPO-clip, with a k3 KL estimate to the frozen reference, Schulman 2020):

    ρ = exp(log π − log π_old),  L_text = −mean_tokens min(ρ·A, clip(ρ, 1 ± ε)·A) + β_text · k3,
    k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1

Image steps (Flow-GRPO, Liu et al. 2025): each SDE step is a Gaussian policy
`x_{t+Δt} ~ N(μ_θ(x_t), σ_t²Δt)`; its log-prob is averaged over latent dimensions (as Flow-GRPO
does, so ratios stay finite), the same clip applies, and the KL to the reference is the Gaussian
mean difference `‖μ_θ − μ_ref‖² / (2 σ_t² Δt)` averaged over dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from avr import flow


@dataclass(frozen=True)
class SdeStep:
    """One sampled SDE step of a rollout image, as the trainer replays it: the state it moved to,
    its times (and the schedule's `t_max`, Flow-GRPO's guard at t = 1) and the log-prob the sampler
    recorded for it (per-dimension mean, as `image_terms` computes it)."""

    x_next: torch.Tensor  # [N, D_tok]
    t: float
    t_next: float
    t_max: float
    logprob: float | None = None


@dataclass(frozen=True)
class AnchorStep:
    """An untrained denoising step of a rollout image replayed for the anchor (its time; the
    state is the block's): only its velocity, against the reference's, is used."""

    t: float


def image_terms(
    x_t: torch.Tensor,
    velocity: torch.Tensor,
    velocity_ref: torch.Tensor,
    steps: Sequence[SdeStep],
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's per-image terms for one replayed SDE step each: the step's log-prob under the
    policy's velocity (mean over dimensions) and the KL to the reference's, `[M]` each."""
    if not steps:  # (a replay of anchor steps alone): empty, still on the graph
        empty = (velocity.sum() * 0).reshape(1)[:0]
        return empty, empty
    x_next = torch.stack([s.x_next for s in steps]).to(velocity)
    t = torch.tensor([s.t for s in steps], device=velocity.device)
    t_next = torch.tensor([s.t_next for s in steps], device=velocity.device)
    t_max = steps[0].t_max
    mean = flow.sde_mean(x_t, velocity, t, t_next, noise_level, t_max)  # [M, N, D]
    mean_ref = flow.sde_mean(x_t, velocity_ref, t, t_next, noise_level, t_max)
    std = flow.sde_std(t, t_next, noise_level, t_max).to(velocity)  # [M]
    logp = flow.gaussian_logprob(x_next, mean, std)  # [M]
    kl = ((mean - mean_ref) ** 2).flatten(1).mean(-1) / (2 * std**2)  # [M]
    return logp, kl


def group_advantages(
    rewards: torch.Tensor,
    groups: Sequence[int],
    scale_std: bool = True,
    clip: float = 5.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages `[B]` (see the module docstring)."""
    groups_t = torch.as_tensor(list(groups))
    advantages = torch.zeros_like(rewards)
    for g in groups_t.unique():
        members = groups_t == g
        r = rewards[members]
        centred = r - r.mean()
        if scale_std and len(r) > 1:
            centred = centred / (r.std(unbiased=False) + eps)
        advantages[members] = centred
    return advantages.clamp(-clip, clip)


class PolicyLoss(nn.Module):
    """PPO-clip surrogate for one kind of action (text tokens or image steps), with KL."""

    def __init__(self, clip_eps: float = 0.2, kl_coef: float = 0.0) -> None:
        super().__init__()
        self.clip_eps, self.kl_coef = clip_eps, kl_coef

    def forward(
        self, logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All inputs `[A]` (one entry per action); returns the mean loss and statistics."""
        if logp.numel() == 0:
            zero = logp.sum() * 0
            return zero, {
                "ratio": torch.tensor(1.0),
                "clipped": torch.tensor(0.0),
                "kl": torch.tensor(0.0),
            }
        ratio = torch.exp(logp - logp_old)  # [A]
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps)
        surrogate = torch.minimum(ratio * advantages, clipped * advantages)  # [A]
        loss = -surrogate.mean() + self.kl_coef * kl.mean()
        stats = {
            "ratio": ratio.detach().mean(),
            "clipped": ((ratio - clipped).abs() > 0).float().mean().detach(),
            "kl": kl.detach().mean(),
        }
        return loss, stats


def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π ‖ π_ref) per sample: non-negative, unbiased."""
    delta = logp_ref - logp
    return torch.exp(delta) - delta - 1


def sampled_text_logprobs(trajectories: Sequence, order: Sequence[int]) -> torch.Tensor:
    """The rollouts' own log-probs of their sampled text tokens, laid out as a replay lays them
    out: trajectory by trajectory in the order their indices first occur in `order` (one entry
    per token, e.g. a packed batch's `label_sample`), each trajectory's tokens in sequence order."""
    return per_text_token(trajectories, order, lambda segment: segment.logprobs)


def behaviour_correction(trajectories: Sequence, order: Sequence[int]) -> torch.Tensor:
    """Per sampled text token (laid out as `sampled_text_logprobs`): `log μ − log π_sampler`
    where the token was drawn from a behaviour distribution μ other than the policy (an explored
    mode token, `segment.behaviour_logprobs`), else 0; added to π_old, it makes μ the ratio's
    denominator."""
    return per_text_token(
        trajectories,
        order,
        lambda s: (
            [mu - lp for mu, lp in zip(s.behaviour_logprobs, s.logprobs, strict=True)]
            if s.behaviour_logprobs
            else [0.0] * len(s.logprobs)
        ),
    )


def per_text_token(trajectories: Sequence, order: Sequence[int], values) -> torch.Tensor:
    """`values(segment)` (one per sampled token) over every sampled text segment, laid out as
    `sampled_text_logprobs` describes."""
    per_trajectory = {
        b: [v for s in t.segments if not s.is_image and s.logprobs for v in values(s)]
        for b, t in enumerate(trajectories)
    }
    return torch.tensor(
        [v for b in dict.fromkeys(order) for v in per_trajectory[b]], dtype=torch.float32
    )
