"""The held-out split: combinations of words reserved for evaluation, never in training data.

ShapeWorld's grammar is small, so prompts sampled for evaluation mostly repeat training prompts
word for word. A prompt is *held out* when it contains a reserved combination, and *train*
otherwise; `avr.data build` (and RL's prompt stream) draw only train prompts, so no held-out prompt
string can occur in training data. Reserved, by tag:

- a colour named with a shape (colors, color_attr, multi_count, multi_relation): one shape per
  colour — red triangle, orange circle, yellow square, green triangle, blue circle, purple square;
- counting: three circles, two squares, four triangles;
- position: six (object, relation, reference) triples, e.g. a circle left of a square;
- two_object: the orders "circle … triangle" and "square … circle";
- single_object: the phrasings "a single triangle", "one circle", "a square".

The model has seen every word and, split apart, every part of each reserved combination; a
held-out prompt asks for a combination it has not seen.
"""

from __future__ import annotations

import numpy as np

from avr.world.spec import PromptSpec

SPLITS: tuple[str, ...] = ("all", "train", "heldout")

RESERVED_COLOURED = frozenset(
    {
        ("red", "triangle"),
        ("orange", "circle"),
        ("yellow", "square"),
        ("green", "triangle"),
        ("blue", "circle"),
        ("purple", "square"),
    }
)
RESERVED_COUNTS = frozenset({("circle", 3), ("square", 2), ("triangle", 4)})
RESERVED_RELATIONS = frozenset(
    {
        ("circle", "left of", "square"),
        ("square", "right of", "triangle"),
        ("triangle", "above", "circle"),
        ("circle", "below", "triangle"),
        ("square", "below", "circle"),
        ("triangle", "right of", "circle"),
    }
)
RESERVED_ORDERS = frozenset({("circle", "triangle"), ("square", "circle")})
RESERVED_PHRASES = ("a single triangle", "one circle", "a square")


def is_held_out(spec: PromptSpec) -> bool:
    """Whether `spec` contains a reserved combination (see the module docstring)."""
    include = spec.include
    if any((c.color, c.cls) in RESERVED_COLOURED for c in include if c.color):
        return True
    if spec.tag == "counting":
        return any((c.cls, c.count) in RESERVED_COUNTS for c in include)
    if spec.tag == "position":
        return any(
            (c.cls, c.position[0], include[c.position[1]].cls) in RESERVED_RELATIONS
            for c in include
            if c.position is not None
        )
    if spec.tag == "two_object" and len(include) == 2:
        return (include[0].cls, include[1].cls) in RESERVED_ORDERS
    if spec.tag == "single_object":
        return any(_names(spec.prompt, phrase) for phrase in RESERVED_PHRASES)
    return False


def check_split(split: str) -> None:
    """Raise `ValueError` naming the valid splits unless `split` is one."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def in_split(spec: PromptSpec, split: str) -> bool:
    """Whether `spec` belongs to `split` (`all`, `train` or `heldout`)."""
    check_split(split)
    return split == "all" or is_held_out(spec) == (split == "heldout")


def draw_in_split(draw, split: str, rng: np.random.Generator, tries: int = 1000) -> PromptSpec:
    """Call `draw(rng)` until the spec it returns is in `split`; every draw consumes `rng`, so
    the result is deterministic given its state."""
    for _ in range(tries):
        spec = draw(rng)
        if in_split(spec, split):
            return spec
    raise ValueError(f"no prompt in split {split!r} after {tries} draws")


def _names(prompt: str, phrase: str) -> bool:
    """Whether `prompt` holds `phrase` as whole words ("a square" is not in "a single square")."""
    words, target = prompt.split(), phrase.split()
    return any(words[i : i + len(target)] == target for i in range(len(words)))
