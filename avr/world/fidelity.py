"""How much an image follows its prompt, beyond GenEval's pass/fail.

GenEval's semantics credit an image with *at least* the asked objects, so a generator that ignores
its prompt and scatters many shape-like fragments passes simple prompts by luck. `Fidelity` counts
what a prompt-blind generator cannot fake:

- colour precision: the share of detected objects whose colour the prompt names (only over images
  whose prompt names a colour; chance is about 1/6);
- shape precision: the share of detected objects whose shape the prompt names (chance about 1/3);
- objects per image against the objects the prompt asks for (extra objects per image);
- exact scenes: the verdict is correct *and* nothing else is drawn (as many objects as asked).

`outcome` names what decided one image's verdict (`OUTCOMES`: exact, extra objects, or the first
of blank canvas, too few objects, wrong shape, wrong colour, wrong count, wrong relation), so a
report can say *why* images fail; `Outcomes` counts them per level.

`BuildsOn` asks whether a mode's later images build on its earlier ones (a refine keeps what its
draft had right, a plan's next sketch what the last had right) or are fresh samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from avr.world.spec import PromptSpec
from avr.world.verify import ProblemKind, Verdict

OUTCOMES: tuple[str, ...] = (
    "exact",
    "extra_objects",
    "blank",
    "too_few_objects",
    "wrong_shape",
    "wrong_colour",
    "wrong_count",
    "wrong_relation",
)
"""An image's outcome, in the order `outcome` checks them: right with nothing else drawn; right
by GenEval's at-least rules but with more objects than asked; then, for a wrong image, the first
that holds: nothing detected; fewer objects than asked; an asked shape absent; an asked shape
present only in other colours; the wrong number of an asked object (or a forbidden one present);
the objects right but a relation wrong."""

_PROBLEM_OUTCOME = {  # in the order `outcome` checks them
    ProblemKind.MISSING: "wrong_shape",
    ProblemKind.WRONG_COLOR: "wrong_colour",
    ProblemKind.WRONG_COUNT: "wrong_count",
    ProblemKind.WRONG_RELATION: "wrong_relation",
}


def asked_objects(spec: PromptSpec) -> int:
    """Objects a scene of `spec` holds exactly (the include clauses' counts)."""
    return sum(c.count for c in spec.include)


@dataclass
class Fidelity:
    """Running counts over judged images; add verdicts with `update`, read the ratios."""

    images: int = 0
    exact: int = 0
    correct: int = 0
    objects: int = 0
    asked: int = 0
    extra: int = 0
    colour_hits: int = 0
    colour_objects: int = 0
    shape_hits: int = 0

    def update(self, verdict: Verdict, spec: PromptSpec) -> None:
        """Count one image's `verdict` against its `spec`."""
        found = verdict.detections
        asked = asked_objects(spec)
        colours = {c.color for c in spec.include if c.color}
        shapes = {c.cls for c in spec.include}
        self.images += 1
        self.correct += verdict.correct
        self.exact += verdict.correct and len(found) == asked
        self.objects += len(found)
        self.asked += asked
        self.extra += max(0, len(found) - asked)
        self.shape_hits += sum(d.shape in shapes for d in found)
        if colours:
            self.colour_objects += len(found)
            self.colour_hits += sum(d.color in colours for d in found)

    def extend(self, pairs: Iterable[tuple[Verdict, PromptSpec]]) -> Fidelity:
        """`update` for each (verdict, spec); returns self."""
        for verdict, spec in pairs:
            self.update(verdict, spec)
        return self

    def summary(self) -> dict[str, float]:
        """The ratios (NaN where nothing was counted): `colour_precision`, `shape_precision`,
        `objects_per_image`, `asked_per_image`, `extra_per_image`, `exact`, `accuracy`."""
        nan = float("nan")

        def ratio(a: int, b: int) -> float:
            return a / b if b else nan

        return {
            "colour_precision": ratio(self.colour_hits, self.colour_objects),
            "shape_precision": ratio(self.shape_hits, self.objects),
            "objects_per_image": ratio(self.objects, self.images),
            "asked_per_image": ratio(self.asked, self.images),
            "extra_per_image": ratio(self.extra, self.images),
            "exact": ratio(self.exact, self.images),
            "accuracy": ratio(self.correct, self.images),
        }


def outcome(verdict: Verdict, spec: PromptSpec) -> str:
    """What decided `verdict` on an image of `spec`: one of `OUTCOMES`."""
    found, asked = len(verdict.detections), asked_objects(spec)
    if verdict.correct:
        return "exact" if found == asked else "extra_objects"
    if found == 0:
        return "blank"
    if found < asked:
        return "too_few_objects"
    problems = {p.problem for p in verdict.problems}
    return next(name for kind, name in _PROBLEM_OUTCOME.items() if kind in problems)


@dataclass
class Outcomes:
    """`outcome` counts per group (a complexity level, say); add images with `update`."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def update(self, verdict: Verdict, spec: PromptSpec, group: str) -> None:
        """Count one image's outcome under `group`."""
        counts = self.counts.setdefault(group, dict.fromkeys(OUTCOMES, 0))
        counts[outcome(verdict, spec)] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """Per group, the share of its images with each outcome (they sum to 1), and `images`."""
        shares = {}
        for group, counts in self.counts.items():
            n = sum(counts.values())
            shares[group] = {k: v / n for k, v in counts.items()} | {"images": float(n)}
        return shares


@dataclass
class BuildsOn:
    """Whether each generated image of a trajectory builds on the one before it (a refine on its
    draft, a plan's next sketch on the last): a step *keeps* when every include clause the
    earlier image satisfied is still satisfied by the later one (judged against the prompt's
    spec). Steps whose earlier image satisfied no clause have nothing to keep and are counted
    apart (`empty`)."""

    steps: int = 0
    kept: int = 0
    empty: int = 0

    def update(self, verdicts: list[Verdict]) -> None:
        """Count the steps of one trajectory: its generated images' verdicts, in order."""
        for before, after in pairwise(verdicts):
            right = {c.index for c in before.clauses if c.kind == "include" and c.satisfied}
            if not right:
                self.empty += 1
                continue
            still = {c.index for c in after.clauses if c.kind == "include" and c.satisfied}
            self.steps += 1
            self.kept += right <= still

    def summary(self) -> dict[str, float]:
        """`rate` (kept / steps, NaN without steps), `steps`, `empty`."""
        return {
            "rate": self.kept / self.steps if self.steps else float("nan"),
            "steps": float(self.steps),
            "empty": float(self.empty),
        }
