"""`FormatReward`: tags well formed and in the order the mode requires (1 or 0)."""

from __future__ import annotations

import re

import torch

from avr.registry import register_reward
from avr.reward import Reward, Rollouts
from avr.sequence import ImageRole, check_tags

_PLAN = re.compile(r"^<ins>step (\d+) of (\d+):.*</ins><des>.*</des>$", re.S)
_MODE = re.compile(r"^<mode:(\w+)>$")


@register_reward("format")
class FormatReward(Reward):
    """1 when every run of text between images has balanced tags and the trajectory has its mode's
    shape: an adaptive choice is one `<mode:…>` token naming the mode that followed; each plan step
    is `<ins>step i of n: …</ins><des>…</des>` with i counting up, before its sketch; a critique
    holds at most one `<refine>…</refine>`. Else 0."""

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return torch.tensor(
            [float(well_formed(t)) for t in rollouts.trajectories], dtype=torch.float32
        )


def well_formed(trajectory) -> bool:
    """Whether `trajectory` follows the format (see `FormatReward`)."""
    segments = trajectory.segments[1:]  # after the prompt
    runs, run = [], []
    for segment in [*segments, None]:
        if segment is None or segment.is_image:
            runs.append("".join(run))
            run = []
        else:
            run.append(segment.text)
    try:
        for text in runs:
            check_tags(text)
    except ValueError:
        return False
    if any(text.count("<refine>") > 1 for text in runs):
        return False
    if runs and (
        chosen := _MODE.match(runs[0].split(">")[0] + ">" if runs[0].startswith("<mode:") else "")
    ):
        if chosen.group(1) != trajectory.meta.get("mode"):
            return False
        runs[0] = runs[0][len(chosen.group(0)) :]
    if trajectory.meta.get("mode") == "plan":
        steps = [m for text in runs if (m := _PLAN.match(_plan_part(text)))]
        sketches = [
            s for s in segments if s.is_image and s.role in (ImageRole.SKETCH, ImageRole.FINAL)
        ]
        if not steps or len(steps) > len(sketches):
            return False
        numbers = [(int(m.group(1)), int(m.group(2))) for m in steps]
        if [i for i, _ in numbers] != list(range(1, len(numbers) + 1)) or len(
            {n for _, n in numbers}
        ) != 1:
            return False
    return True


def _plan_part(text: str) -> str:
    start = text.find("<ins>")
    return text[start:] if start >= 0 else ""
