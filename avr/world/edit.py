"""Correcting an image by editing what it shows: the refine target of a trajectory built from the
model's own samples.

`detected_scene` reads an image as a scene (the verifier's detections, as clean objects where they
were found). `correct_scene` makes the fewest edits to such a scene that make a spec hold, in the
critique's vocabulary: objects that already satisfy a clause stay where they are; an object of the
right shape and the wrong colour is recoloured; what is missing is added in free space; an object
on the wrong side of its relation's target is moved; objects an exclude clause forbids are removed.
Objects no clause speaks of are kept, as the critique does not mention them. The result is checked
with the verifier on its render, so a refine target is always an image the verifier accepts.
"""

from __future__ import annotations

import numpy as np

from avr.world.prompts import SAMPLER_MARGIN, free_color
from avr.world.render import render
from avr.world.scene import Scene, SceneObject
from avr.world.spec import Clause, PromptSpec
from avr.world.verify import Detection, Verifier, box_relations

#: Size of an added object when the image shows none to copy (the scene sampler's middle size).
ADDED_SIZE = 0.18
#: Free space kept around every object placed by an edit (the scene sampler's gap).
GAP = 0.03


def detected_scene(detections: tuple[Detection, ...] | list[Detection], side: int) -> Scene:
    """The objects the verifier found in a `side`-pixel image, as a scene: each at its box centre,
    its size the longer side of its box (at least 2 pixels), drawn largest first."""
    objects = []
    for d in detections:
        x0, y0, x1, y1 = d.box
        size = min(1.0, max(x1 - x0, y1 - y0, 2.0) / side)
        objects.append(
            SceneObject(d.shape, d.color, (x0 + x1) / 2 / side, (y0 + y1) / 2 / side, size)
        )
    return Scene(tuple(objects))


def correct_scene(
    scene: Scene,
    spec: PromptSpec,
    rng: np.random.Generator,
    resolution: int = 64,
    verifier: Verifier | None = None,
    tries: int = 20,
) -> Scene | None:
    """`scene` with the fewest edits that make `spec` hold on its render (see the module
    docstring), or None when `tries` placements of the added and moved objects all fail. The
    second half of the tries moves every object of a clause with a relation, not only those on
    the wrong side (a chain of relations may leave no free spot for a single move)."""
    verifier = verifier or Verifier()
    for attempt in range(tries):
        edited = _edit(scene, spec, rng, relayout=attempt >= tries // 2)
        if edited is not None and verifier.verify(render(edited, resolution), spec).correct:
            return edited
    return None


def _edit(
    scene: Scene, spec: PromptSpec, rng: np.random.Generator, relayout: bool = False
) -> Scene | None:
    objects: list[SceneObject | None] = list(scene.objects)
    sizes = [o.size for o in scene.objects]
    size = float(np.median(sizes)) if sizes else ADDED_SIZE
    used: set[int] = set()
    members: list[list[int]] = []  # per include clause: the indices that satisfy it
    for clause in spec.include:
        chosen = _candidates(objects, clause, used, exact=True)[: clause.count]
        recolour = [k for k in _candidates(objects, clause, used, exact=False) if k not in chosen]
        for k in recolour[: clause.count - len(chosen)]:
            objects[k] = _with(objects[k], color=clause.color)
            chosen.append(k)
        used.update(chosen)
        while len(chosen) < clause.count:
            color = clause.color or free_color(spec, clause, rng)
            objects.append(SceneObject(clause.cls, color, 0.5, 0.5, size))
            chosen.append(len(objects) - 1)
            used.add(chosen[-1])
            if not _place(objects, chosen[-1], clause, members, rng):
                return None
        if clause.position is not None:
            for k in chosen:
                right = not relayout and _holds(objects[k], clause, members, objects)
                if not right and not _place(objects, k, clause, members, rng):
                    return None
        members.append(chosen)
    for clause in spec.exclude:
        present = _candidates(objects, clause, set(), exact=True)
        spare = [k for k in present if k not in used] + [k for k in present if k in used]
        for k in spare[: max(0, len(present) - clause.count + 1)]:
            if k in used:
                return None  # an include clause needs what the exclude forbids: not drawable
            objects[k] = None
    return Scene(tuple(o for o in objects if o is not None))


def _candidates(objects, clause: Clause, used: set[int], exact: bool) -> list[int]:
    """Unused objects of the clause's shape: of its colour (`exact`), or of another colour."""
    out = []
    for k, o in enumerate(objects):
        if o is None or k in used or o.shape != clause.cls:
            continue
        same = clause.color is None or o.color == clause.color
        if same == exact:
            out.append(k)
    return out


def _holds(obj: SceneObject, clause: Clause, members, objects) -> bool:
    relation, target = clause.position
    return all(relation in box_relations(obj.box, objects[t].box) for t in members[target])


def _place(objects, k: int, clause: Clause, members, rng, attempts: int = 200) -> bool:
    """Move object `k` to a free spot (keeping `GAP` from the others) where its relation holds
    with the sampler's margin; False when no spot is found."""
    obj = objects[k]
    others = [o for j, o in enumerate(objects) if j != k and o is not None]
    targets = [] if clause.position is None else [objects[t] for t in members[clause.position[1]]]
    half = obj.size / 2
    for _ in range(attempts):
        x, y = rng.uniform(half + GAP, 1 - half - GAP, size=2)
        moved = _with(obj, x=float(x), y=float(y))
        if any(_overlap(moved, o) for o in others):
            continue
        if targets and not all(
            clause.position[0] in box_relations(moved.box, t.box, *SAMPLER_MARGIN) for t in targets
        ):
            continue
        objects[k] = moved
        return True
    return False


def _overlap(a: SceneObject, b: SceneObject) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP


def _with(obj: SceneObject, **changes) -> SceneObject:
    return SceneObject(**{**obj.__dict__, **changes})
