"""ShapeWorld scenes: the vocabulary, the public palette, objects and the edits a plan or a refine makes.

Geometry is resolution-free: an object's centre and size are fractions of the canvas side, so one
scene renders identically (up to sampling) at 32 px or 64 px. The image y axis points down, as in
GenEval, so "above" means a smaller y.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: sRGB values (0–255) of the six ShapeWorld colors. Public so that other code (and people) can draw
#: images the verifier reads: the verifier classifies pixels by these values.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (255, 140, 0),
    "yellow": (235, 210, 0),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
}
#: Canvas color: white.
BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def check_vocabulary(*, shape: str | None = None, color: str | None = None) -> None:
    """Raise `ValueError` naming the word and the vocabulary when `shape` or `color` is not ShapeWorld's."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    if color is not None and color not in COLORS:
        raise ValueError(f"color {color!r} is not one of {', '.join(COLORS)}")


@dataclass(frozen=True)
class SceneObject:
    """One object: a shape of one color, its centre `(x, y)` and bounding-box side `size`, all in [0, 1]."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        check_vocabulary(shape=self.shape, color=self.color)
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {self.size}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box `(x0, y0, x1, y1)` in canvas fractions."""
        half = self.size / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)

    def describe(self) -> str:
        """Short English name, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An ordered collection of objects on a white canvas.

    The order is the drawing order and the order a plan adds objects in. Edits return new scenes.
    """

    objects: tuple[SceneObject, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))

    def __len__(self) -> int:
        return len(self.objects)

    def subset(self, indices: Iterable[int]) -> Scene:
        """The partial scene with only `indices` (kept in scene order): an intermediate state of a plan."""
        keep = sorted(set(self._check_index(i) for i in indices))
        return Scene(tuple(self.objects[i] for i in keep))

    def recolor(self, index: int, color: str) -> Scene:
        """The scene with object `index` painted `color`."""
        return self._replace(index, color=color)

    def move(self, index: int, x: float, y: float) -> Scene:
        """The scene with object `index` centred at `(x, y)`."""
        return self._replace(index, x=x, y=y)

    def remove(self, index: int) -> Scene:
        """The scene without object `index`."""
        self._check_index(index)
        return Scene(self.objects[:index] + self.objects[index + 1 :])

    def add(self, obj: SceneObject) -> Scene:
        """The scene with `obj` drawn last."""
        return Scene((*self.objects, obj))

    def to_json(self) -> list[dict]:
        """Plain JSON form: a list of object dicts (the inverse of `Scene.from_json`)."""
        return [dataclasses.asdict(o) for o in self.objects]

    @classmethod
    def from_json(cls, data: Sequence[dict]) -> Scene:
        """Build a scene from `Scene.to_json` output."""
        return cls(tuple(SceneObject(**o) for o in data))

    def _replace(self, index: int, **changes) -> Scene:
        self._check_index(index)
        objects = list(self.objects)
        objects[index] = dataclasses.replace(objects[index], **changes)
        return Scene(tuple(objects))

    def _check_index(self, index: int) -> int:
        if not -len(self.objects) <= index < len(self.objects):
            raise IndexError(
                f"object index {index} out of range for a scene of {len(self)} objects"
            )
        return index % len(self.objects)
