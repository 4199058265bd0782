"""`CompositionalReward`: the ShapeWorld verifier on a rollout's final image."""

from __future__ import annotations

from avr.registry import register_reward
from avr.reward import FinalImageReward
from avr.world.fidelity import asked_objects
from avr.world.verify import Verifier


@register_reward("compositional")
class CompositionalReward(FinalImageReward):
    """The verifier's partial score (fraction of clauses satisfied), or strict correctness (1/0)
    with `strict=True`. A trajectory without an image scores 0.

    GenEval's semantics credit *at least* the asked objects, so a policy can raise this score by
    drawing more shapes. `extra_penalty` closes that: each object detected beyond the prompt's
    count (the include clauses' counts) costs that much, down to a floor of 0; e.g. 0.25 makes
    four extra objects cost a whole correct image. Evaluation keeps GenEval's semantics (and
    reports objects per image beside accuracy)."""

    def __init__(self, strict: bool = False, extra_penalty: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if extra_penalty < 0:
            raise ValueError(f"extra_penalty must be ≥ 0, got {extra_penalty}")
        self.strict, self.extra_penalty = strict, extra_penalty
        self.verifier = Verifier()

    def score_image(self, image, spec) -> float:
        verdict = self.verifier.verify(image, spec)
        score = float(verdict.correct) if self.strict else verdict.score
        if self.extra_penalty:
            extra = max(0, len(verdict.detections) - asked_objects(spec))
            score = max(0.0, score - self.extra_penalty * extra)
        return score
