"""How well a model reads its own work, measured on its rollouts against the exact verifier.

- **Critique agreement**: every critique a trajectory holds (the text between an image and the next
  plan step or image) says "right" (no `<refine>`) or "wrong"; the verifier judges the image it
  follows, against the prompt, or against the plan step's partial spec after a sketch. Agreement is
  reported overall, per level, for first critiques (of a draft or a step's first sketch) and later
  ones (of a refined image), per problem kind of the wrong images, with false alarms (right images
  called wrong) and misses (wrong images called right) apart, and as balanced accuracy.
- **Plan steps**: each `<ins>…</ins>` the model writes against the teacher's instruction for that
  step (`avr.data.teacher.plan_instruction`), exact match.
- **Refines**: of refines that start from a wrong image, how many end right (fixed); of those that
  start from a right one, how many end wrong (broken).
- **Descriptions**: a critique that opens with `<des>…</des>` (data built with
  `--describe-critiques`) against what the verifier sees on the canvas it follows
  (`avr.data.critique.read_canvas`): exact text, and the same objects (colour and shape, as many of
  each) wherever they are.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from avr.data.critique import description, is_verdict_ok, read_canvas
from avr.data.teacher import partial_spec, plan_instruction
from avr.sequence import Trajectory, tries
from avr.world import PromptSpec, Verifier, complexity

_INS = re.compile(r"<ins>(.*?)</ins>", re.S)


@dataclass
class _Tally:
    """Critiques of right and wrong images, by what they said."""

    accepted: int = 0  # right image, said right
    false_alarms: int = 0  # right image, said wrong
    caught: int = 0  # wrong image, said wrong
    misses: int = 0  # wrong image, said right

    def add(self, image_right: bool, said_right: bool) -> None:
        if image_right:
            self.accepted += said_right
            self.false_alarms += not said_right
        else:
            self.misses += said_right
            self.caught += not said_right

    def summary(self) -> dict:
        right, wrong = self.accepted + self.false_alarms, self.caught + self.misses
        n = right + wrong
        rates = [self.accepted / right if right else None, self.caught / wrong if wrong else None]
        known = [r for r in rates if r is not None]
        return {
            "critiques": n,
            "right_images": right,
            "wrong_images": wrong,
            "agreement": (self.accepted + self.caught) / n if n else None,
            "balanced_accuracy": sum(known) / len(known) if known else None,
            "false_alarm_rate": self.false_alarms / right if right else None,
            "miss_rate": self.misses / wrong if wrong else None,
        }


@dataclass
class Understanding:
    """Accumulates critique agreement, plan-step accuracy and refine outcomes over rollouts."""

    verifier: Verifier = field(default_factory=Verifier)
    overall: _Tally = field(default_factory=_Tally)
    by_level: dict[str, _Tally] = field(default_factory=dict)
    by_round: dict[str, _Tally] = field(default_factory=dict)
    by_problem: dict[str, _Tally] = field(default_factory=dict)
    plan_steps: Counter = field(default_factory=Counter)
    refines: Counter = field(default_factory=Counter)
    descriptions: Counter = field(default_factory=Counter)
    trajectories: int = 0
    critiques_written: int = 0

    def update(self, trajectory: Trajectory, spec: PromptSpec) -> None:
        """Score one rollout of `spec` (each of its tries in its own context: `tries`)."""
        self.trajectories += 1
        for context in tries(trajectory):
            self._context(context, spec)

    def _context(self, trajectory: Trajectory, spec: PromptSpec) -> None:
        level = complexity(spec).level
        step = -1  # the plan step the images belong to (-1: no plan)
        verdict = None  # the verifier's judgement of the last image
        side = 0  # the last image's side in pixels
        first = True  # whether the next critique is the first one of its draft or step
        text = ""  # what was written since the last image
        for segment in [*trajectory.segments[1:], None]:
            if segment is not None and not segment.is_image:
                text += segment.text
                continue
            critique = text.split("<ins>", 1)[0]
            if verdict is not None and critique.strip():
                self._critique(verdict, is_verdict_ok(critique), level, first)
                self._description(description(critique), verdict, side)
                first = False
            instructions = _INS.findall(text)
            for instruction in instructions:
                step += 1
                first = True
                self.plan_steps["written"] += 1
                if step < len(spec.include):
                    self.plan_steps["exact"] += instruction.strip() == plan_instruction(spec, step)
            if segment is None:
                break
            target = partial_spec(spec, step) if 0 <= step < len(spec.include) else spec
            judged = self.verifier.verify(segment.image, target)
            if verdict is not None and "<refine>" in critique and not instructions:
                start_right = verdict.correct
                self.refines["from_right" if start_right else "from_wrong"] += 1
                self.refines["broken"] += start_right and not judged.correct
                self.refines["fixed"] += not start_right and judged.correct
            verdict, text, side = judged, "", segment.image.width
        if step >= 0:
            self.plan_steps["asked"] += len(spec.include)

    def _critique(self, verdict, said_right: bool, level: str, first: bool) -> None:
        self.critiques_written += 1
        for tally in (
            self.overall,
            self.by_level.setdefault(level, _Tally()),
            self.by_round.setdefault("first" if first else "later", _Tally()),
        ):
            tally.add(verdict.correct, said_right)
        if not verdict.correct:
            kind = str(verdict.problems[0].problem or "extra")
            self.by_problem.setdefault(kind, _Tally()).add(False, said_right)

    def _description(self, written: str | None, verdict, side: int) -> None:
        """A critique's `<des>` (None: it wrote none) against the verifier's reading of the image
        it follows (`verdict`, of a `side`-pixel image)."""
        if written is None:
            return
        seen = read_canvas(verdict.detections, side)
        self.descriptions["written"] += 1
        self.descriptions["exact"] += written == seen
        self.descriptions["objects"] += _objects(written) == _objects(seen)

    def summary(self) -> dict:
        """Plain numbers for `metrics.json`."""
        written = self.plan_steps["written"]
        wrong, right = self.refines["from_wrong"], self.refines["from_right"]
        return {
            "critique": {
                **self.overall.summary(),
                "by_level": {k: t.summary() for k, t in sorted(self.by_level.items())},
                "by_round": {k: t.summary() for k, t in sorted(self.by_round.items())},
                "by_problem": {k: t.summary() for k, t in sorted(self.by_problem.items())},
                "per_trajectory": self.critiques_written / self.trajectories
                if self.trajectories
                else 0.0,
            },
            "plan_steps": {
                "written": written,
                "asked": self.plan_steps["asked"],
                "exact": self.plan_steps["exact"],
                "accuracy": self.plan_steps["exact"] / written if written else None,
            },
            "descriptions": {
                "written": (described := self.descriptions["written"]),
                "exact": self.descriptions["exact"],
                "objects": self.descriptions["objects"],
                "accuracy": self.descriptions["exact"] / described if described else None,
                "object_accuracy": self.descriptions["objects"] / described if described else None,
            },
            "refines": {
                "from_wrong": wrong,
                "fixed": self.refines["fixed"],
                "fix_rate": self.refines["fixed"] / wrong if wrong else None,
                "from_right": right,
                "broken": self.refines["broken"],
                "break_rate": self.refines["broken"] / right if right else None,
            },
        }


def _objects(text: str) -> Counter:
    """The objects a description names (`a red circle at the top left, …`), where they are
    dropped: colour and shape, with how many of each."""
    return Counter(part.split(" at ")[0].strip() for part in text.split(",") if part.strip())
