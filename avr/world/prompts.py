"""Prompt sets and the scenes that satisfy them.

`sample_spec(tag, rng)` writes one GenEval-format spec with a natural-language prompt drawn from
varied templates; `sample_scene(spec, rng)` places objects so that the spec holds, with margins wide
enough that the verifier judges the render correct after pixel rounding, blur and noise.

Tags: GenEval's six, plus two meant for planning:
`multi_count` (2–3 colored groups with counts, exact counts enforced by exclude clauses) and
`multi_relation` (3–5 colored objects, two or more relations between them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from avr.world.scene import COLORS, RELATIONS, SHAPES, Scene, SceneObject
from avr.world.spec import Clause, PromptSpec, check_spec_vocabulary
from avr.world.verify import box_relations

GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
PLANNING_TAGS: tuple[str, ...] = ("multi_count", "multi_relation")
TAGS: tuple[str, ...] = GENEVAL_TAGS + PLANNING_TAGS

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_FRAMES = (
    "a photo of {}",
    "{}",
    "an image of {}",
    "a picture showing {}",
    "draw {}",
    "{} on a white background",
    "a simple drawing of {}",
)
_RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right side of"),
    "above": ("above", "higher than"),
    "below": ("below", "under", "beneath"),
}
#: Relations in sampled scenes hold under a stricter rule than the verifier's (20% shrink, a 49° cone
#: instead of 10% and 60°), so pixel rounding, blur and noise leave them true.
SAMPLER_MARGIN = (0.2, 0.65)


def sample_specs(
    n: int, tags: Sequence[str] = TAGS, seed: int = 0, split: str = "all"
) -> list[PromptSpec]:
    """`n` specs cycling through `tags` in order, deterministic given `seed`; `split` (`all`,
    `train`, `heldout`) keeps only prompts of that split (`avr.world.split`)."""
    from avr.world.split import check_split, draw_in_split

    unknown = [t for t in tags if t not in _WRITERS]
    if unknown:
        raise ValueError(f"unknown tag {unknown[0]!r}; expected one of {', '.join(TAGS)}")
    if not tags:
        raise ValueError("no tags given")
    check_split(split)  # an unknown split fails before any drawing
    rng = np.random.default_rng(seed)
    if split == "all":  # the historical stream, unchanged
        return [sample_spec(tags[i % len(tags)], rng) for i in range(n)]
    return [draw_in_split(partial(sample_spec, tags[i % len(tags)]), split, rng) for i in range(n)]


def sample_spec(tag: str, rng: np.random.Generator) -> PromptSpec:
    """One spec of `tag`."""
    if tag not in _WRITERS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
    include, exclude, text = _WRITERS[tag](rng)
    prompt = _pick(rng, _FRAMES).format(text)
    return PromptSpec(tag, prompt, tuple(include), tuple(exclude))


def sample_scene(
    spec: PromptSpec,
    rng: np.random.Generator,
    size: tuple[float, float] = (0.15, 0.22),
    gap: float = 0.03,
    tries: int = 500,
) -> Scene:
    """A scene in which `spec` holds: the include clauses' objects (exactly `count` each; random
    colors where a clause names none), separated by at least `gap`, relations held with a margin.

    Raises `ValueError` for a spec ShapeWorld cannot draw (unknown words, too many objects).
    """
    check_spec_vocabulary(spec)
    wanted = [(i, c) for i, c in enumerate(spec.include) for _ in range(c.count)]
    for _ in range(tries):
        scene = _try_place(spec, wanted, rng, size, gap)
        if scene is not None:
            return scene
    raise ValueError(f"could not place the objects of {spec.prompt!r} in {tries} tries")


def _try_place(spec, wanted, rng, size, gap) -> Scene | None:
    placed: list[tuple[int, SceneObject]] = []
    for clause_index, clause in wanted:
        color = clause.color or free_color(spec, clause, rng)
        for _ in range(100):
            s = float(rng.uniform(*size))
            x, y = rng.uniform(s / 2 + gap, 1 - s / 2 - gap, size=2)
            obj = SceneObject(clause.cls, color, float(x), float(y), s)
            if _fits(obj, clause, placed, gap):
                placed.append((clause_index, obj))
                break
        else:
            return None
    return Scene(tuple(o for _, o in placed))


def free_color(spec: PromptSpec, clause: Clause, rng) -> str:
    """A colour for an object of a clause that names none: not one that would complete (and so
    break the count of) a coloured clause of its class."""
    taken = {c.color for c in (*spec.include, *spec.exclude) if c.cls == clause.cls and c.color}
    return _pick(rng, [c for c in COLORS if c not in taken] or COLORS)


def _fits(obj: SceneObject, clause: Clause, placed, gap: float) -> bool:
    for _, other in placed:
        a, b = obj.box, other.box
        if a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap:
            return False
    if clause.position is not None:
        relation, target = clause.position
        for index, other in placed:
            if index == target and relation not in box_relations(
                obj.box, other.box, *SAMPLER_MARGIN
            ):
                return False
    return True


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _distinct(rng: np.random.Generator, options: Sequence, k: int) -> list:
    return [options[i] for i in rng.permutation(len(options))[:k]]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _count_phrase(count: int, noun: str, rng) -> str:
    if count == 1:
        return _a(noun)
    number = _NUMBERS[count] if rng.random() < 0.75 else str(count)
    return f"{number} {noun}s"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _single_object(rng):
    cls = _pick(rng, SHAPES)
    noun = _pick(rng, (_a(cls), f"one {cls}", f"a single {cls}"))
    return [Clause(cls)], [], noun


def _two_object(rng):
    a, b = _distinct(rng, SHAPES, 2)
    return (
        [Clause(a), Clause(b)],
        [],
        _pick(rng, ("{} and {}", "{} next to {}", "{} with {}")).format(_a(a), _a(b)),
    )


def _counting(rng):
    cls, n = _pick(rng, SHAPES), int(rng.integers(2, 5))
    text = _count_phrase(n, cls, rng)
    return [Clause(cls, n)], [Clause(cls, n + 1)], _pick(rng, ("{}", "exactly {}")).format(text)


def _colors(rng):
    cls, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    return [Clause(cls, 1, color)], [], _pick(rng, ("{}", "{} alone")).format(_a(f"{color} {cls}"))


def _position(rng):
    a, b = _distinct(rng, SHAPES, 2)
    relation = _pick(rng, RELATIONS)
    text = f"{_a(b)} {_pick(rng, _RELATION_WORDS[relation])} {_a(a)}"
    return [Clause(a), Clause(b, 1, position=(relation, 0))], [], text


def _color_attr(rng):
    a, b = _distinct(rng, SHAPES, 2)
    ca, cb = _distinct(rng, COLORS, 2)
    include = [Clause(a, 1, ca), Clause(b, 1, cb)]
    return include, [], f"{_a(f'{ca} {a}')} and {_a(f'{cb} {b}')}"


def _multi_count(rng):
    groups = int(rng.integers(2, 4))
    pairs = _distinct(rng, [(s, c) for s in SHAPES for c in COLORS], groups)
    while True:
        counts = [int(rng.integers(1, 4)) for _ in range(groups)]
        if max(counts) >= 2 and sum(counts) <= 7:
            break
    include = [Clause(s, n, c) for (s, c), n in zip(pairs, counts, strict=True)]
    exclude = [Clause(s, n + 1, c) for (s, c), n in zip(pairs, counts, strict=True)]
    text = _join(
        [_count_phrase(n, f"{c} {s}", rng) for (s, c), n in zip(pairs, counts, strict=True)]
    )
    return include, exclude, text


def _multi_relation(rng):
    # Relations are read off a random layout, so every spec has a scene (chains of four "above"s,
    # say, would rarely fit the canvas if relations were drawn first).
    n = int(rng.integers(3, 6))
    pairs = _distinct(rng, [(s, c) for s in SHAPES for c in COLORS], n)
    layout_spec = PromptSpec("layout", "layout", tuple(Clause(s, 1, c) for s, c in pairs))
    while True:
        layout = sample_scene(layout_spec, rng).objects
        relations: list[tuple[int, str] | None] = [None]
        for i in range(1, n):
            options = [
                (t, r)
                for t in range(i)
                for r in sorted(box_relations(layout[i].box, layout[t].box, *SAMPLER_MARGIN))
            ]
            relations.append(_pick(rng, options) if options and rng.random() < 0.7 else None)
        if sum(r is not None for r in relations) >= 2:
            break
    include, parts = [], []
    for (shape, color), relation in zip(pairs, relations, strict=True):
        name = f"{color} {shape}"
        if relation is None:
            include.append(Clause(shape, 1, color))
            parts.append(_a(name))
        else:
            target, word = relation
            t_shape, t_color = pairs[target]
            include.append(Clause(shape, 1, color, (word, target)))
            parts.append(f"{_a(name)} {_pick(rng, _RELATION_WORDS[word])} the {t_color} {t_shape}")
    return include, [], _join(parts)


_WRITERS: dict[str, Callable] = {
    "single_object": _single_object,
    "two_object": _two_object,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attr": _color_attr,
    "multi_count": _multi_count,
    "multi_relation": _multi_relation,
}


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """ShapeWorld text to train a tokenizer on: `n` prompts over every tag, plus every word of the
    vocabulary in the phrases critiques and plans use. Deterministic given `seed`."""
    words = [*SHAPES, *(f"{s}s" for s in SHAPES), *COLORS, *_NUMBERS]
    phrases = [w for options in _RELATION_WORDS.values() for w in options]
    return [s.prompt for s in sample_specs(n, seed=seed)] + [" ".join(words), *phrases]
