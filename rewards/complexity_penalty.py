"""`ComplexityPenalty`: an expensive mode pays where a cheap one already succeeds (intra-group).

Within each group (rollouts of one prompt), let `c*` be the cost of the cheapest rollout whose final
image the verifier judges correct. Every rollout of the group gets

    penalty = −min(1, (cost − c*) / c*)        (0 for the cheapest successes themselves)

Cost is the rollout's velocity evaluations (`meta["nfe"]`, CFG counted twice), or, for a trajectory
without that record, its number of images. **When no rollout of a group succeeds, nobody is
penalized** (0): spending more compute is the only way out of a prompt nothing solves yet.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from avr.registry import register_reward
from avr.reward import Reward, Rollouts
from avr.world.verify import Verifier


def rollout_cost(trajectory) -> float:
    """Velocity evaluations of a rollout (or its image count when it has no such record)."""
    return float(trajectory.meta.get("nfe", len(trajectory.images)))


@register_reward("complexity_penalty")
class ComplexityPenalty(Reward):
    """Non-positive; weight it in the composite to trade accuracy for compute."""

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verifier = Verifier()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        success = [
            image is not None and self.verifier.verify(image, spec).correct
            for image, spec in rollouts.finals()
        ]
        costs = [rollout_cost(t) for t in rollouts.trajectories]
        cheapest: dict[int, float] = defaultdict(lambda: float("inf"))
        for group, ok, cost in zip(rollouts.groups, success, costs, strict=True):
            if ok:
                cheapest[group] = min(cheapest[group], cost)
        penalties = []
        for group, cost in zip(rollouts.groups, costs, strict=True):
            best = cheapest[group]
            penalties.append(
                0.0 if best == float("inf") else -min(1.0, (cost - best) / max(best, 1.0))
            )
        return torch.tensor(penalties, dtype=torch.float32).clamp(max=0.0)
