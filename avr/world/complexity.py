"""Instruction complexity: how much a prompt asks for, and the level that picks a teacher mode.

From the spec's include clauses (exclude clauses only sharpen a count and add nothing to draw):

- entities   = Σ count                      (objects to draw)
- attributes = clauses with a color + 2 × clauses with count > 1   (bindings to get right)
- relations  = clauses with a position      (each weighs 2: two objects must be placed together)

`score = entities + attributes + 2 × relations`, and the level is

| level   | score | typical tags                                   | teacher mode |
| ------- | ----- | ---------------------------------------------- | ------------ |
| simple  | ≤ 3   | single_object, two_object, colors              | direct       |
| medium  | 4–6   | counting, position, color_attr                 | reflect      |
| complex | ≥ 7   | multi_count, multi_relation                    | plan         |
"""

from __future__ import annotations

from dataclasses import dataclass

from avr.world.spec import PromptSpec

LEVELS: tuple[str, ...] = ("simple", "medium", "complex")
SIMPLE_MAX = 3
MEDIUM_MAX = 6


@dataclass(frozen=True)
class Complexity:
    """The counts behind a spec's complexity and the level they give."""

    entities: int
    attributes: int
    relations: int

    @property
    def score(self) -> int:
        """`entities + attributes + 2 × relations`."""
        return self.entities + self.attributes + 2 * self.relations

    @property
    def level(self) -> str:
        """`simple`, `medium` or `complex` (thresholds in the module docstring)."""
        if self.score <= SIMPLE_MAX:
            return "simple"
        return "medium" if self.score <= MEDIUM_MAX else "complex"


def complexity(spec: PromptSpec) -> Complexity:
    """Count the entities, attributes and relations `spec` asks for."""
    include = spec.include
    return Complexity(
        entities=sum(c.count for c in include),
        attributes=sum(c.color is not None for c in include)
        + 2 * sum(c.count > 1 for c in include),
        relations=sum(c.position is not None for c in include),
    )
