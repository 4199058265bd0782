"""`StepwiseReasoningReward`: dense credit for the intermediate steps, judged by the verifier.

Each check is 1 or 0; the reward is their mean, NaN for a rollout with no step to judge (`direct`):

- a plan step's sketch satisfies its step: the spec's first i include clauses (step i of the plan);
- a critique's verdict agrees with the verifier on the image it judged (the whole spec, or the
  plan step's part of it after a sketch);
- a refinement raises the verifier's partial score, or keeps it at 1.

`CritiqueAgreementReward` (`critique`) is the critique check alone, as its own term of the
composite, so that RL cannot buy reward by calling every image right.
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
            [
                _mean([ok for _, ok in step_checks(t, s, self.verifier)])
                for t, s in zip(rollouts.trajectories, rollouts.specs, strict=True)
            ],
            dtype=torch.float32,
        )


@register_reward("critique")
class CritiqueAgreementReward(Reward):
    """The share of a rollout's critiques whose verdict agrees with the verifier on the image they
    judge (NaN for a rollout without a critique).

    The step-wise mean holds this check beside the others, at a weight the compute penalty
    outbids: where a cheaper rollout of the group succeeds, a refine costs −0.3 (`rl.yaml`'s
    `complexity_penalty`), and saying "matches" to a wrong draft ends the rollout for free. As its
    own term, weighted above that price, an honest "wrong" pays more than a false "matches"
    (tested on `rl.yaml`'s composite)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verifier = Verifier()

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return torch.tensor(
            [
                _mean([ok for kind, ok in step_checks(t, s, self.verifier) if kind == "critique"])
                for t, s in zip(rollouts.trajectories, rollouts.specs, strict=True)
            ],
            dtype=torch.float32,
        )


def step_checks(trajectory, spec, verifier: Verifier) -> list[tuple[str, bool]]:
    """Every judged step of `trajectory` in order, as `(kind, passed)`: `sketch` (a plan step's
    first sketch satisfies its step), `critique` (a verdict agrees with the verifier on the image
    it follows) and `refine` (a redraw raises the partial score, or keeps it at 1)."""
    checks: list[tuple[str, bool]] = []
    target, step, last = spec, 0, None  # last: (image, partial score, plan step) just judged
    for segment in trajectory.segments[1:]:
        if segment.is_image:
            image = segment.image.convert("RGB")
            verdict = verifier.verify(image, target)
            if last is not None and last[2] == step:  # a redraw of the current image
                checks.append(("refine", verdict.score > last[1] or verdict.score == 1.0))
            elif step:  # the first sketch of a plan step
                checks.append(("sketch", verdict.correct))
            last = (image, verdict.score, step)
        elif "</ins>" in segment.text:  # a plan step: the target grows to its clauses
            step += 1
            target = _partial(spec, step)
        elif last is not None and _is_critique(segment.text):
            agrees = is_verdict_ok(segment.text) == verifier.verify(last[0], target).correct
            checks.append(("critique", agrees))
    return checks


def _mean(checks: list[bool]) -> float:
    return sum(checks) / len(checks) if checks else float("nan")


def _is_critique(text: str) -> bool:
    return bool(text.strip()) and not text.startswith("<mode:") and text != "<ins>"


def _partial(spec, steps: int):
    """What must hold after `steps` plan steps (counted from 1; at least the first clause)."""
    return partial_spec(spec, max(1, min(steps, len(spec.include))) - 1)
