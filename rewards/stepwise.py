"""`StepwiseReasoningReward`: dense credit for the intermediate steps, judged by the verifier.

Each check is 1 or 0; the reward is their mean, NaN for a rollout with no step to judge (`direct`):

- a plan step's sketch satisfies its step: the spec's first i include clauses (step i of the plan);
- a critique's verdict agrees with the verifier on the image it judged (the whole spec, or the
  plan step's part of it after a sketch);
- a refinement raises the verifier's partial score, or keeps it at 1.
"""

from __future__ import annotations

import torch

from avr.data.critique import is_verdict_ok
from avr.data.teacher import partial_spec
from avr.registry import register_reward
from avr.reward import Reward, Rollouts
from avr.world.verify import Verifier


@register_reward("stepwise")
class StepwiseReasoningReward(Reward):
    """Mean of the step checks (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verifier = Verifier()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return torch.tensor(
            [self._score(t, s) for t, s in zip(rollouts.trajectories, rollouts.specs, strict=True)],
            dtype=torch.float32,
        )

    def _score(self, trajectory, spec) -> float:
        checks: list[bool] = []
        target, step, last = spec, 0, None  # last: (image, partial score, plan step) just judged
        for segment in trajectory.segments[1:]:
            if segment.is_image:
                image = segment.image.convert("RGB")
                verdict = self.verifier.verify(image, target)
                if last is not None and last[2] == step:  # a redraw of the current image
                    checks.append(verdict.score > last[1] or verdict.score == 1.0)
                elif step:  # the first sketch of a plan step
                    checks.append(verdict.correct)
                last = (image, verdict.score, step)
            elif "</ins>" in segment.text:  # a plan step: the target grows to its clauses
                step += 1
                target = _partial(spec, step)
            elif last is not None and _is_critique(segment.text):
                checks.append(
                    is_verdict_ok(segment.text) == self.verifier.verify(last[0], target).correct
                )
        return sum(checks) / len(checks) if checks else float("nan")


def _is_critique(text: str) -> bool:
    return bool(text.strip()) and not text.startswith("<mode:") and text != "<ins>"


def _partial(spec, steps: int):
    """What must hold after `steps` plan steps (counted from 1; at least the first clause)."""
    return partial_spec(spec, max(1, min(steps, len(spec.include))) - 1)
