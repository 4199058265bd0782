"""Rectified flow: the noising path, training timesteps, and the ODE / SDE samplers.

Convention (SD3, FLUX): `x_t = (1 − t)·x₀ + t·ε`, `t ∈ [0, 1]`, `t = 1` is pure noise; the model
predicts the velocity `v = ε − x₀`, and sampling integrates from `t = 1` down to `t = 0`.

The SDE sampler is Flow-GRPO's (Liu et al., 2025, eq. 9): with `σ_t = a·√(t / (1 − t))`,

    x_{t+Δt} = x_t + [v + σ_t² / (2t) · (x_t + (1 − t)·v)]·Δt + σ_t·√(−Δt)·ε,   Δt < 0,

a Gaussian step whose log-density is the policy's log-prob for RL. At `a = 0` it is the Euler ODE.
"""

from __future__ import annotations

import math

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """`s·t / (1 + (s − 1)·t)`: `s > 1` spends more of the schedule at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, generator=None
) -> torch.Tensor:
    """`n` training timesteps, logit-normal (`sigmoid(N(mean, std))`) then shifted."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift_time(t, shift)


def schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """`steps + 1` times from 1 down to 0 (uniform, then shifted by `shift_time`): BAGEL's grid
    (its `generate_image` with `num_timesteps = steps + 1`). diffusers' `FlowMatchEulerDiscreteScheduler`
    applies the same shift, but its default grid is spaced over [1, 1/1000] before a final 0 (up to
    0.24 apart at 10 steps, shift 3); given these times unshifted as `sigmas`, it gives this grid
    and the same Euler steps (tests/backbone/test_flow.py)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


def noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 − t)·x₀ + t·ε` (`t` broadcast over all but the first dim)."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


Generators = torch.Generator | list[torch.Generator | None] | None
"""One generator for the whole batch, or one per row (a batch of episodes, each drawing its own
noise: a row's draws then do not depend on which other rows share the batch; `None`: zeros)."""


def randn(shape: tuple[int, ...], generator: Generators = None) -> torch.Tensor:
    """Standard normal noise of `shape` (on the CPU); per-row generators draw row by row."""
    if not isinstance(generator, list):
        return torch.randn(shape, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack(
        [
            torch.zeros(shape[1:]) if g is None else torch.randn(shape[1:], generator=g)
            for g in generator
        ]
    )


def ode_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of `dx/dt = v`."""
    return x + (t_next - t) * v


def _sigma_sq(t, noise_level: float, t_max):
    # σ_t² = a²·t / (1 − t), with t = 1 replaced by t_max in the denominator (Flow-GRPO).
    return noise_level**2 * t / (1 - torch.where(t >= 1, torch.as_tensor(t_max, dtype=t.dtype), t))


def _times(x: torch.Tensor, *times):
    """Times as tensors shaped to broadcast over `x` (scalars, or one per sample)."""
    shaped = []
    for t in times:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        shaped.append(t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t)
    return shaped


def sde_std(t, t_next, noise_level: float, t_max) -> torch.Tensor:
    """Std `σ_t·√(t − t_next)` of one SDE step (scalar or one per sample)."""
    t, t_next = (
        torch.as_tensor(t, dtype=torch.float64),
        torch.as_tensor(t_next, dtype=torch.float64),
    )
    return torch.sqrt(_sigma_sq(t, noise_level, t_max) * (t - t_next))


def sde_mean(
    x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float, t_max
) -> torch.Tensor:
    """Mean of one SDE step (the drift part of the formula in the module docstring); `t`,
    `t_next` are scalars or one per sample."""
    t, t_next = _times(x, t, t_next)
    sigma_sq = _sigma_sq(t, noise_level, t_max)
    return x + (v + sigma_sq / (2 * t) * (x + (1 - t) * v)) * (t_next - t)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: float,
    t_next: float,
    noise_level: float,
    t_max: float,
    generator: Generators = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample `x_{t_next}`; returns it and its log-prob per sample (the mean over all other dims,
    as Flow-GRPO and the trainer take it), or None at `noise_level = 0`, where the step is
    deterministic."""
    mean = sde_mean(x, v, t, t_next, noise_level, t_max)
    std = float(sde_std(t, t_next, noise_level, t_max))
    if std == 0:
        return mean, None
    eps = randn(tuple(x.shape), generator).to(x.device, x.dtype)
    x_next = mean + std * eps
    return x_next, gaussian_logprob(x_next, mean, std)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """`log N(x; mean, std²)` per dimension, averaged over all dims but the first (`std`: scalar
    or per sample). The mean, not the sum, keeps the ratios of a 64×192-dim step finite."""
    (std,) = _times(x, std)
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(-1)
