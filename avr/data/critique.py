"""Critique language: the verifier's diagnostic as text, and the edit a `<refine>` asks for.

A right image gets a verdict sentence; a wrong one gets what is wrong, then `<refine>edits</refine>`.
`is_verdict_ok` reads a critique back (the policy's too): it is right exactly when it holds no
`<refine>`. `read_canvas` says what is on a canvas (a critique's optional `<des>`), `describe`
what a scene holds (a plan step's `<des>`).
"""

from __future__ import annotations

import re

from avr.world.edit import detected_scene
from avr.world.scene import Scene, SceneObject
from avr.world.spec import Clause, PromptSpec
from avr.world.verify import ClauseResult, Detection, ProblemKind, Verdict

OK_IMAGE = "the image matches the prompt."
OK_STEP = "this step is done."
_NUMBER = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def critique_text(verdict: Verdict, spec: PromptSpec, ok_text: str = OK_IMAGE) -> str:
    """The critique of an image the verifier judged with `verdict` against `spec`."""
    if verdict.correct:
        return ok_text
    problems = [_problem(p, spec, verdict) for p in verdict.problems]
    said = "; ".join(dict.fromkeys(text for text, _ in problems))
    edits = "; ".join(dict.fromkeys(edit for _, edit in problems))
    return f"{said}. <refine>{edits}</refine>"


EMPTY_CANVAS = "nothing"
_DESCRIPTION = re.compile(r"<des>(.*?)</des>", re.S)


_THIRDS = (("top", "middle", "bottom"), ("left", "center", "right"))


def _third(coordinate: float) -> int:
    return 0 if coordinate < 0.38 else 2 if coordinate > 0.62 else 1


def describe(scene: Scene) -> str:
    """Where everything is, in the scene's order: ``a red circle at the top left, a blue square at
    the bottom right`` (`EMPTY_CANVAS` for no object)."""

    def place(o: SceneObject) -> str:
        row, col = _THIRDS[0][_third(o.y)], _THIRDS[1][_third(o.x)]
        return "the center" if (row, col) == ("middle", "center") else f"the {row} {col}"

    return ", ".join(f"a {o.color} {o.shape} at {place(o)}" for o in scene.objects) or EMPTY_CANVAS


def read_canvas(detections: tuple[Detection, ...] | list[Detection], side: int) -> str:
    """What the verifier sees in a `side`-pixel image (its `detections`): one phrase per object (so a
    count is as many phrases), in reading order (top to bottom by the third of the canvas its
    centre is in, then left to right), without places, to keep a critique short: ``a red circle, a
    red circle, a blue square`` (`EMPTY_CANVAS` for none)."""
    objects = detected_scene(detections, side).objects
    ordered = sorted(objects, key=lambda o: (_third(o.y), o.x))
    return ", ".join(f"a {o.color} {o.shape}" for o in ordered) or EMPTY_CANVAS


def description(critique: str) -> str | None:
    """The `<des>` a critique opens with (stripped), or None where it has none."""
    found = _DESCRIPTION.search(critique)
    return found.group(1).strip() if found else None


def is_verdict_ok(text: str) -> bool:
    """Whether a critique judges the image right (no `<refine>` in it)."""
    return "<refine>" not in text


def name(clause: Clause, count: int = 1) -> str:
    """`red circle`, `two red circles`, `circle`."""
    noun = f"{clause.color} {clause.cls}" if clause.color else clause.cls
    if count == 1:
        return noun
    return f"{_NUMBER[count] if count < len(_NUMBER) else count} {noun}s"


def _problem(result: ClauseResult, spec: PromptSpec, verdict: Verdict) -> tuple[str, str]:
    clause, found = result.clause, result.found
    if result.kind == "exclude":
        extra = found - clause.count + 1
        return (
            f"there are {found} {name(clause)}s, too many",
            f"remove {name(clause, extra) if extra > 1 else 'one ' + name(clause)}",
        )
    missing = clause.count - found
    wanted = {c.color for c in spec.include if c.cls == clause.cls}
    others = [
        d.color for d in verdict.detections if d.shape == clause.cls and d.color not in wanted
    ]
    if result.problem is ProblemKind.MISSING or (
        result.problem is ProblemKind.WRONG_COLOR and not others
    ):  # every object of the class is another clause's: nothing to recolour, one to add
        return f"there is no {name(clause)}", f"add {_a(name(clause, clause.count))}"
    if result.problem is ProblemKind.WRONG_COLOR:
        return (
            f"the {clause.cls} should be {clause.color}, not {others[0]}",
            f"make the {others[0]} {clause.cls} {clause.color}",
        )
    if result.problem is ProblemKind.WRONG_COUNT:
        return (
            f"there {'is' if found == 1 else 'are'} {_NUMBER[found]} {name(clause)}"
            f"{'' if found == 1 else 's'}, not {_NUMBER[clause.count]}",
            f"add {_a(name(clause, missing))}",
        )
    relation, target = clause.position
    target_name = name(spec.include[target])
    return (
        f"the {name(clause)} is not {relation} the {target_name}",
        f"move the {name(clause)} {relation} the {target_name}",
    )


def _a(noun: str) -> str:
    if noun.split()[0] in _NUMBER:
        return noun
    return ("an " if noun[0] in "aeiou" else "a ") + noun
