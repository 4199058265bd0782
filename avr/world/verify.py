"""The ShapeWorld verifier: detect objects in any RGB image by pixels alone, then score a spec the
way GenEval does.

Detection. Every pixel is modelled as a blend `p = α·c + (1 − α)·background` of the white canvas and
one palette color `c`; the color whose blend line passes closest to `p` wins, and pixels with `α > ½`
are foreground. Anti-aliased edges, mild blur and noise move `α` a little but rarely the color.
Foreground splits into 4-connected components; a component in which two colors each hold a large
share is split by color (objects drawn touching). A component's color is its majority color; its
shape is the one whose rendered coverage, placed by the component's soft area and centroid, best
matches the observed blend weights (least squares).

Scoring follows GenEval's `evaluate` (its semantics, adapted to exact colors): an include clause
needs at least `count` objects of its class (and color, when given); its position is checked on the
largest `count` of them against the matched objects of the clause it names, by GenEval's
box-centre rule; an exclude clause fails the image when `count` or more such objects are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from PIL import Image
from scipy import ndimage

from avr.world.render import coverage
from avr.world.scene import BACKGROUND, COLORS, PALETTE, SHAPES
from avr.world.spec import Clause, PromptSpec, check_spec_vocabulary

#: GenEval's POSITION_THRESHOLD: a relation must hold beyond 10% of the two boxes' summed sides.
POSITION_THRESHOLD = 0.1

_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array([PALETTE[c] for c in COLORS], dtype=np.float32) - _BG  # [C, 3]
_DIRS_SQ = (_DIRS**2).sum(-1)  # [C]


class ProblemKind(StrEnum):
    """What is wrong with an image for one clause."""

    MISSING = "missing"
    WRONG_COLOR = "wrong_color"
    WRONG_COUNT = "wrong_count"
    WRONG_RELATION = "wrong_relation"


@dataclass(frozen=True)
class Detection:
    """One detected object: its fitted box `(x0, y0, x1, y1)` and soft area, in pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    area: float

    @property
    def center(self) -> tuple[float, float]:
        """Box centre in pixels."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class ClauseResult:
    """How one clause fared: `found` matching objects, and the problem when it is not satisfied."""

    kind: str  # "include" | "exclude"
    index: int
    clause: Clause
    satisfied: bool
    found: int
    problem: ProblemKind | None = None
    message: str = ""


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one image against one spec."""

    correct: bool
    clauses: tuple[ClauseResult, ...]
    detections: tuple[Detection, ...] = field(repr=False)

    @property
    def score(self) -> float:
        """Partial score: the fraction of clauses (include and exclude) satisfied."""
        return sum(c.satisfied for c in self.clauses) / len(self.clauses)

    @property
    def problems(self) -> list[ClauseResult]:
        """The unsatisfied clauses, in spec order: the diagnostic a critique is written from."""
        return [c for c in self.clauses if not c.satisfied]

    @property
    def reason(self) -> str:
        """GenEval's `reason` field: one line per problem, empty when correct."""
        return "\n".join(c.message for c in self.problems)


@dataclass
class Verifier:
    """Detects ShapeWorld objects in RGB images and scores GenEval specs against them.

    Thresholds are fractions so that one verifier serves every resolution.
    """

    min_area: float = 0.0025
    """Smallest object, as a fraction of the image area (noise specks are smaller)."""
    split_share: float = 0.25
    """A second color splits a component when it holds at least this share of its pixels."""
    max_fit_error: float = 0.15
    """A blob is an object only if its best shape fit leaves at most this squared error per unit
    of area (clean renders: ≤ 0.03; blurred and noisy: ≤ 0.06; speckled generated noise: ~0.4)."""

    def detect(self, image: Image.Image | np.ndarray) -> list[Detection]:
        """Every object in `image`, largest first."""
        pixels = _as_pixels(image)
        height, width, _ = pixels.shape
        min_pixels = max(3.0, self.min_area * height * width)
        raw = _blend_weights(pixels)  # [H, W, C]
        label = _best_color(pixels, raw)  # [H, W]
        foreground = _foreground(raw, label)
        components, _ = ndimage.label(foreground)
        masks: list[tuple[np.ndarray, int]] = []
        for index, region in enumerate(ndimage.find_objects(components), start=1):
            mask = np.zeros_like(foreground)
            mask[region] = components[region] == index
            counts = np.bincount(label[mask], minlength=len(COLORS))
            major = [c for c in np.argsort(-counts) if counts[c] >= self.split_share * mask.sum()]
            if len(major) <= 1:
                masks.append((mask, int(counts.argmax())))
                continue
            for c in major:  # touching objects of different colors
                parts, n = ndimage.label(mask & (label == c))
                masks += [(parts == j, int(c)) for j in range(1, n + 1)]
        detections = []
        for mask, color in masks:
            found = _fit(mask, raw[..., color], foreground & ~mask, min_pixels, self.max_fit_error)
            if found is not None:
                shape, box, area = found
                detections.append(Detection(shape, COLORS[color], box, area))
        return sorted(detections, key=lambda d: -d.area)

    def background(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The pixels (`[H, W]` bool) that belong to no object: those whose blend weight toward
        their closest palette color is at most 0.5, the complement of what `detect` segments."""
        pixels = _as_pixels(image)
        raw = _blend_weights(pixels)
        return ~_foreground(raw, _best_color(pixels, raw))

    def verify(self, image: Image.Image | np.ndarray, spec: PromptSpec) -> Verdict:
        """Score `image` against `spec` (GenEval semantics); see the module docstring."""
        check_spec_vocabulary(spec)
        detections = self.detect(image)
        results: list[ClauseResult] = []
        matched: list[list[Detection] | None] = []
        for i, clause in enumerate(spec.include):
            result, group = _check_include(i, clause, detections, matched)
            results.append(result)
            matched.append(group)
        for i, clause in enumerate(spec.exclude):
            found = len(_matching(clause, detections))
            ok = found < clause.count
            message = (
                "" if ok else f"expected fewer than {clause.count} {_name(clause)}, found {found}"
            )
            problem = None if ok else ProblemKind.WRONG_COUNT
            results.append(ClauseResult("exclude", i, clause, ok, found, problem, message))
        correct = all(r.satisfied for r in results)
        return Verdict(correct, tuple(results), tuple(detections))


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of `a` to `b` by GenEval's rule (see `box_relations`)."""
    return box_relations(a.box, b.box)


def box_relations(
    box_a, box_b, threshold: float = POSITION_THRESHOLD, cutoff: float = 0.5
) -> set[str]:
    """Relations of box `a` to box `b` (`x0, y0, x1, y1`, y down) by GenEval's rule: the centre
    offset, shrunk on each axis by `threshold` × the two boxes' summed sides, must point within
    60° (`cutoff` = cos 60°) of the relation's axis. A scene sampler passes stricter values."""
    box_a, box_b = np.asarray(box_a, dtype=float), np.asarray(box_b, dtype=float)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    dims = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -cutoff:
        relations.add("left of")
    if dx > cutoff:
        relations.add("right of")
    if dy < -cutoff:
        relations.add("above")
    if dy > cutoff:
        relations.add("below")
    return relations


def _check_include(
    i: int, clause: Clause, detections: list[Detection], matched: list[list[Detection] | None]
) -> tuple[ClauseResult, list[Detection] | None]:
    objects = _matching(clause, detections)
    same_class = [d for d in detections if d.shape == clause.cls]
    if len(objects) < clause.count:
        if not same_class:
            kind = ProblemKind.MISSING
        elif clause.color is not None and (len(same_class) >= clause.count or not objects):
            kind = ProblemKind.WRONG_COLOR
        else:
            kind = ProblemKind.WRONG_COUNT
        others = _census(same_class)
        message = f"expected {_name(clause)}>={clause.count}, found {len(objects)}" + (
            f"; and {others}" if clause.color is not None and others else ""
        )
        return ClauseResult("include", i, clause, False, len(objects), kind, message), None
    chosen = objects[: clause.count]
    if clause.position is not None:
        relation, target = clause.position
        targets = matched[target]
        if targets is None:
            message = f"no target for {_name(clause)} to be {relation}"
            result = ClauseResult(
                "include", i, clause, False, len(objects), ProblemKind.WRONG_RELATION, message
            )
            return result, None
        for obj in chosen:
            for other in targets:
                found = relative_position(obj, other)
                if relation not in found:
                    where = " and ".join(sorted(found)) or "overlapping"
                    message = f"expected {_name(clause)} {relation} target, found {where} target"
                    kind = ProblemKind.WRONG_RELATION
                    return ClauseResult(
                        "include", i, clause, False, len(objects), kind, message
                    ), None
    return ClauseResult("include", i, clause, True, len(objects)), chosen


def _matching(clause: Clause, detections: list[Detection]) -> list[Detection]:
    return [
        d
        for d in detections
        if d.shape == clause.cls and (clause.color is None or d.color == clause.color)
    ]


def _name(clause: Clause) -> str:
    return f"{clause.color} {clause.cls}" if clause.color else clause.cls


def _census(detections: list[Detection]) -> str:
    counts: dict[str, int] = {}
    for d in detections:
        counts[d.color] = counts.get(d.color, 0) + 1
    return ", ".join(f"{n} {c}" for c, n in counts.items())


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        return np.asarray(image, dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB array of shape (H, W, 3), got {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32) * 255.0  # floats are read as [0, 1]
    return array.astype(np.float32)


def _blend_weights(pixels: np.ndarray) -> np.ndarray:
    """Per pixel and palette color `c`, the weight `α` with `p ≈ α·c + (1 − α)·background`
    (least squares, unclipped so that noise averages out)."""
    offset = pixels - _BG  # [H, W, 3]
    return np.einsum("hwk,ck->hwc", offset, _DIRS) / _DIRS_SQ  # [H, W, C]


def _best_color(pixels: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the palette color whose blend line passes closest."""
    alpha = np.clip(raw, 0.0, 1.0)[..., None]  # [H, W, C, 1]
    residual = ((pixels - _BG)[..., None, :] - alpha * _DIRS) ** 2  # [H, W, C, 3]
    return residual.sum(-1).argmin(-1)


def _foreground(raw: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Pixels more than half their closest palette color."""
    return np.take_along_axis(raw, label[..., None], -1)[..., 0] > 0.5


#: Area of each shape as a fraction of its bounding box's.
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
_PAD = 2


def shape_box(shape: str, area: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """The box `(x0, y0, x1, y1)` of `shape` drawn with `area` pixels and centroid `(cx, cy)`:
    how the shape fit places a blob."""
    side = float(np.sqrt(area / _FILL[shape]))
    # A triangle's centroid lies 2/3 of the way down from its apex: its box centre is side/6 up.
    top = cy - side / 2 - (side / 6 if shape == "triangle" else 0.0)
    return (cx - side / 2, top, cx + side / 2, top + side)


def _fit(
    mask: np.ndarray, alpha: np.ndarray, others: np.ndarray, min_area: float, max_error: float
):
    """Fit each shape to one object's blend weights and keep the best.

    The soft area `Σα` and centroid survive anti-aliasing and blur (blur moves mass, it does not
    create it); given a shape they fix its box, and the rendered coverage of that box is compared
    with the observed weights. Returns `(shape, box, area)`, or None for a speck or for a blob no
    shape explains (squared error above `max_error` per unit of area).
    """
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    x0, y0 = max(0, xs.min() - _PAD), max(0, ys.min() - _PAD)
    x1, y1 = min(width, xs.max() + 1 + _PAD), min(height, ys.max() + 1 + _PAD)
    valid = ~others[y0:y1, x0:x1]  # pixels of other objects say nothing about this one
    observed = np.clip(alpha[y0:y1, x0:x1], -0.5, 1.5) * valid  # [h, w]
    area = float(observed.sum())
    if area < min_area:
        return None
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    cx, cy = float((observed * gx).sum() / area), float((observed * gy).sum() / area)
    best = None
    for shape in SHAPES:
        box = shape_box(shape, area, cx, cy)
        error = float((((observed - coverage(shape, box, (x0, y0, x1, y1))) * valid) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, shape, box)
    if best[0] > max_error * area:
        return None
    return best[1], best[2], area
