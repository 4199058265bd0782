"""Rewards: `torchmetrics.Metric` objects that score rollouts, one value per trajectory.

The same object scores an evaluation (`update` over batches, `compute` is the mean) and returns
per-sample rewards in RL (`score`). A reward returns NaN where it does not apply to a sample (a
step-wise reward on a `direct` rollout); means and the composite ignore NaN. `CompositeReward`
holds `{name: RewardTerm(reward, weight)}` together and reports every component under its name.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from avr.sequence import Trajectory
from avr.world.spec import PromptSpec, parse_spec


@dataclass
class Rollouts:
    """A batch of trajectories with each one's spec and group (rollouts of the same prompt share
    a group id)."""

    trajectories: Sequence[Trajectory]
    specs: Sequence[PromptSpec]
    groups: Sequence[int]

    def __post_init__(self) -> None:
        if not len(self.trajectories) == len(self.specs) == len(self.groups):
            raise ValueError(
                f"got {len(self.trajectories)} trajectories, {len(self.specs)} specs, {len(self.groups)} groups"
            )

    @classmethod
    def of(
        cls, trajectories: Sequence[Trajectory], groups: Sequence[int] | None = None
    ) -> Rollouts:
        """Rollouts whose specs are read from each trajectory's `meta["spec"]`."""
        specs = [
            t.meta["spec"] if isinstance(t.meta["spec"], PromptSpec) else parse_spec(t.meta["spec"])
            for t in trajectories
        ]
        return cls(
            trajectories,
            specs,
            list(groups) if groups is not None else list(range(len(trajectories))),
        )

    def __len__(self) -> int:
        return len(self.trajectories)

    def finals(self):
        """`(final image as RGB or None, spec)` per rollout."""
        for trajectory, spec in zip(self.trajectories, self.specs, strict=True):
            image = trajectory.final_image
            yield (image.convert("RGB") if image is not None else None), spec


class Reward(Metric):
    """Base class: implement `score`; NaN marks samples the reward does not apply to.
    `judges_images`: whether the reward scores what was drawn (RL's image advantages come only
    from such rewards; text advantages from the whole composite)."""

    higher_is_better = True
    full_state_update = False
    judges_images: bool = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """Per-trajectory rewards `[B]`, float32, NaN where not applicable."""

    def update(self, rollouts: Rollouts) -> None:
        """Accumulate the applicable rewards of a batch."""
        rewards = self.score(rollouts)
        valid = ~torch.isnan(rewards)
        self.total += rewards[valid].sum().to(self.total)
        self.count += int(valid.sum())

    def compute(self) -> torch.Tensor:
        """Mean over applicable samples since the last reset (NaN if none applied)."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class FinalImageReward(Reward):
    """A reward on each rollout's final image and its spec; a rollout that drew nothing scores 0."""

    judges_images = True

    @abstractmethod
    def score_image(self, image, spec: PromptSpec) -> float:
        """The reward of one final image (PIL, RGB) for `spec`."""

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        rewards = [
            0.0 if image is None else self.score_image(image, spec)
            for image, spec in rollouts.finals()
        ]
        return torch.tensor(rewards, dtype=torch.float32)


@dataclass
class RewardTerm:
    """One component of a composite: the reward, its weight, and what a NaN score ("does not apply
    to this sample", e.g. the step-wise reward of a `direct` rollout) contributes: `missing`
    (default 0, no contribution), or None to let the NaN through, which makes that sample's
    composite NaN and RL skips the step."""

    reward: Reward
    weight: float = 1.0
    missing: float | None = 0.0


class CompositeReward(Reward):
    """`Σ weight · reward` over components; a NaN component contributes its term's `missing`
    (default 0). Infinite scores are kept as they are, never clamped to a finite number, so a
    caller's finiteness check sees them (RL skips such a step)."""

    def __init__(self, terms: Mapping[str, RewardTerm], **kwargs) -> None:
        super().__init__(**kwargs)
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        self.terms = dict(terms)
        for name, term in self.terms.items():
            self.add_module(f"term_{name}", term.reward)

    def score_parts(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The composite `[B]` and each component's own scores (NaN kept, for logging)."""
        parts = {name: term.reward.score(rollouts) for name, term in self.terms.items()}
        return self._weighted(parts, list(self.terms)), parts

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_parts(rollouts)[0]

    def image_total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """`Σ weight · reward` over the terms whose reward judges images (from `score_parts`'
        parts); None when no term does."""
        judged = [name for name, term in self.terms.items() if term.reward.judges_images]
        return self._weighted(parts, judged) if judged else None

    def _weighted(self, parts: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        """`Σ weight · score` over `names`, each NaN filled as its term says."""
        return sum(
            self.terms[name].weight * _fill_nan(parts[name], self.terms[name].missing)
            for name in names
        )


def _fill_nan(scores: torch.Tensor, missing: float | None) -> torch.Tensor:
    """`scores` with NaN replaced by `missing` (None: kept); ±inf are left alone (unlike
    `torch.nan_to_num`, which would turn them into ±3.4e38, a finite reward that trains)."""
    if missing is None:
        return scores
    return torch.where(torch.isnan(scores), torch.as_tensor(missing, dtype=scores.dtype), scores)
