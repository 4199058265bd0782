"""Capability-aware adaptive labels: the cheapest mode that succeeds *for the model being trained*.

The papers' hierarchical data pipeline labels each prompt with the mode a model actually needs,
not with a fixed complexity table: a model that draws two objects right at once should learn to
answer such prompts directly, one that fails them should learn to reflect or plan. `ModeLabeler`
rolls a prompt out with each mode (ODE images, greedy text, `samples` seeds) and says whether the
mode's success rate under the verifier clears `threshold`; `ShapeWorldTeacher(mode_succeeds=…)`
then labels the adaptive trajectory with the cheapest mode that does, falling back to the
complexity level's mode when none does.
"""

from __future__ import annotations

from avr.policy import SamplingConfig
from avr.registry import MODES
from avr.rollout import Job, rollout, rollout_seed
from avr.world import PromptSpec, Verifier


class ModeLabeler:
    """`labeler(mode, spec)`: whether `model` succeeds on `spec` with `mode` at least
    `threshold` of the time over `samples` rollouts (cached per mode and prompt)."""

    def __init__(
        self,
        model,
        samples: int = 2,
        threshold: float = 0.5,
        steps: int = 10,
        seed: int = 0,
        max_text_tokens: int = 96,
    ) -> None:
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.model, self.samples, self.threshold, self.seed = model, samples, threshold, seed
        self.sampling = SamplingConfig(
            steps=steps, temperature=0.0, max_text_tokens=max_text_tokens
        )
        self.verifier = Verifier()
        self.rates: dict[tuple[str, PromptSpec], float] = {}

    def success_rate(self, mode: str, spec: PromptSpec) -> float:
        """Share of `samples` rollouts of `mode` whose final image the verifier accepts."""
        key = (mode, spec)
        if key not in self.rates:
            self.model.eval()
            mode_ = MODES.get(mode)()
            # every prompt's k-th sample from the same seed: a label compares modes, not draws
            jobs = [Job(mode_, spec, rollout_seed(self.seed, 0, k)) for k in range(self.samples)]
            wins = 0
            for trajectory in rollout(self.model, jobs, self.sampling):
                final = trajectory.final_image
                wins += final is not None and self.verifier.verify(final, spec).correct
            self.rates[key] = wins / self.samples
        return self.rates[key]

    def __call__(self, mode: str, spec: PromptSpec) -> bool:
        return self.success_rate(mode, spec) >= self.threshold
