"""`CompositionalReward`: the ShapeWorld verifier on a rollout's final image."""

from __future__ import annotations

from avr.registry import register_reward
from avr.reward import FinalImageReward
from avr.world.verify import Verifier


@register_reward("compositional")
class CompositionalReward(FinalImageReward):
    """The verifier's partial score (fraction of clauses satisfied), or strict correctness (1/0)
    with `strict=True`. A trajectory without an image scores 0."""

    def __init__(self, strict: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strict = strict
        self.verifier = Verifier()

    def score_image(self, image, spec) -> float:
        verdict = self.verifier.verify(image, spec)
        return float(verdict.correct) if self.strict else verdict.score
