"""`CompositionalReward`: the ShapeWorld verifier on a rollout's final image."""

from __future__ import annotations

import torch

from avr.registry import register_reward
from avr.reward import Reward, Rollouts
from avr.world.verify import Verifier


@register_reward("compositional")
class CompositionalReward(Reward):
    """The verifier's partial score (fraction of clauses satisfied), or strict correctness (1/0)
    with `strict=True`. A trajectory without an image scores 0."""

    def __init__(self, strict: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strict = strict
        self.verifier = Verifier()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        rewards = []
        for image, spec in rollouts.finals():
            if image is None:
                rewards.append(0.0)
                continue
            verdict = self.verifier.verify(image, spec)
            rewards.append(float(verdict.correct) if self.strict else verdict.score)
        return torch.tensor(rewards, dtype=torch.float32)
