"""Free text → `PromptSpec`: read a ShapeWorld prompt someone typed, so its image can be judged.

`parse_prompt("a red circle left of a blue square")` returns the spec the prompt sampler would have
written for that text (tag, include and exclude clauses), or None when the grammar cannot read it
(the prompt still generates; only the verifier has nothing to judge against). The grammar is the
sampler's (`avr.world.prompts`): an optional frame ("a photo of …", "draw …", "… on a white
background"), then objects joined by commas, "and", "next to" or "with"; an object is a count ("a",
"an", "one", "a single", a number word or digits), an optional colour, a shape (plural when
counted), and optionally a relation ("left of", "to the left of", "higher than", "beneath", …) to
"the <colour> <shape>" named before it, or, in a two-object prompt, to "a <shape>" after it.

Exact counts follow the sampler's convention: a counted object (and every group of a prompt that
counts one) excludes one more of it (`exactly` or not), as GenEval's counting prompts do.
"""

from __future__ import annotations

import re

from avr.world.prompts import _FRAMES, _NUMBERS, _RELATION_WORDS
from avr.world.scene import COLORS, SHAPES
from avr.world.spec import Clause, PromptSpec

_PREFIXES = sorted((f.split("{}")[0] for f in _FRAMES if f.split("{}")[0]), key=len, reverse=True)
_SUFFIXES = sorted((f.split("{}")[1] for f in _FRAMES if f.split("{}")[1]), key=len, reverse=True)
_RELATION = {word: canonical for canonical, words in _RELATION_WORDS.items() for word in words}
_COUNT = r"(?P<count>a single|an|a|one|zero|two|three|four|five|six|seven|eight|\d{1,2})"
_COLOR = r"(?:(?P<color>{}) )?".format("|".join(COLORS))
_SHAPE = r"(?P<shape>{})(?P<plural>s?)".format("|".join(SHAPES))
_TARGET = r"(?P<article>the|an|a) (?:(?P<tcolor>{}) )?(?P<tshape>{})".format(
    "|".join(COLORS), "|".join(SHAPES)
)
_WORDS = "|".join(sorted(map(re.escape, _RELATION), key=len, reverse=True))
_OBJECT = re.compile(rf"{_COUNT} {_COLOR}{_SHAPE}(?: (?P<relation>{_WORDS}) {_TARGET})?")
_SPLIT = re.compile(r", | and | next to | with ")


def parse_prompt(text: str) -> PromptSpec | None:
    """The spec of a ShapeWorld prompt, or None when the grammar above cannot read `text`."""
    body = " ".join(text.lower().strip().rstrip(".").split())
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    for suffix in _SUFFIXES:
        if body.endswith(suffix):
            body = body[: -len(suffix)]
            break
    alone = body.endswith(" alone")
    body = body.removesuffix(" alone").removeprefix("exactly ")
    objects = [_OBJECT.fullmatch(part) for part in _SPLIT.split(body)]
    if not body or None in objects:
        return None
    include: list[Clause] = []
    for match in objects:
        count = _count(match["count"])
        if count is None or count < 1 or (count > 1) != bool(match["plural"]):
            return None
        clause = Clause(match["shape"], count, match["color"])
        if match["relation"]:
            relation = _RELATION[match["relation"]]
            target = Clause(match["tshape"], 1, match["tcolor"])
            if match["article"] == "the":  # an object named before
                named = [
                    i
                    for i, c in enumerate(include)
                    if (c.cls, c.color) == (target.cls, target.color)
                ]
                index = named[0] if len(named) == 1 else None
                if index is None:
                    return None
            elif len(objects) == 1:  # "a square left of a circle": the circle comes first
                include.append(target)
                index = 0
            else:
                return None
            clause = Clause(clause.cls, clause.count, clause.color, (relation, index))
        include.append(clause)
    if alone and not (len(include) == 1 and include[0].color):
        return None
    tag = _tag(include)
    counted = tag in ("counting", "multi_count")
    exclude = tuple(Clause(c.cls, c.count + 1, c.color) for c in include) if counted else ()
    return PromptSpec(tag, text, tuple(include), exclude)


def _count(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    if word in ("a", "an", "a single", "one"):
        return 1
    return _NUMBERS.index(word) if word in _NUMBERS else None


def _tag(include: list[Clause]) -> str:
    """The sampler's tag for these clauses (the nearest one where no template wrote them)."""
    colored = all(c.color for c in include)
    related = any(c.position for c in include)
    counted = any(c.count > 1 for c in include)
    if len(include) == 1:
        return "counting" if counted else "colors" if colored else "single_object"
    if related:
        return "position" if len(include) == 2 else "multi_relation"
    if counted:
        return "multi_count" if colored else "counting"
    if len(include) == 2:
        return "color_attr" if colored else "two_object"
    return "multi_count" if colored else "two_object"
