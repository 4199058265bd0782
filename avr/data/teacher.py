"""`ShapeWorldTeacher`: the actor that builds SFT trajectories from a sample's target scene.

- `plan`: one step per include clause, in spec order: `<ins>step i of n: add …</ins>` and a
  `<des>` describing everything on the canvas after the step;
- `draft`: a render — of the target (direct), of the target with one realistic error (reflect:
  wrong color, missing or extra object, swapped relation), of the plan's partial scene (sketch, with
  an injected error at rate `sketch_error_rate`); or, with `draft_model`, an image the model draws
  itself (self-sampling, as the process-driven paper does);
- `reflect`: the verifier's judgement of the current image, as a critique (with
  `describe_critiques`, after a `<des>` of what the verifier sees on the canvas: `read_canvas`);
- `refine`: the render of what the critique asked for (the target, or the plan's partial scene).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from avr.backbone.tokenizer import mode_token
from avr.data.critique import OK_IMAGE, OK_STEP, critique_text, describe, name, read_canvas
from avr.protocol import Critique, Episode
from avr.registry import MODES
from avr.sequence import ImageRole, Segment
from avr.world import COLORS, PromptSpec, Scene, SceneObject, Verifier, complexity, render

#: The teacher's mode for each complexity level (the adaptive policy's SFT label).
LEVEL_MODES = {"simple": "direct", "medium": "reflect", "complex": "plan"}


@dataclass
class TeacherState:
    """What the teacher keeps of one episode (`Episode.state`): the scene the next image should
    show (the target, or a plan step's partial scene) and, within a plan, the step's partial spec
    (what a sketch and its critique are judged against)."""

    target: Scene
    step_spec: PromptSpec | None = None


class ShapeWorldTeacher:
    """Performs the four steps from a target scene that satisfies `spec`."""

    def __init__(
        self,
        scene: Scene,
        rng: np.random.Generator,
        resolution: int = 64,
        sketch_error_rate: float = 0.2,
        draft_model: Callable[[PromptSpec], Image.Image] | None = None,
        mode_succeeds: Callable[[str, PromptSpec], bool] | None = None,
        verifier: Verifier | None = None,
        describe_critiques: bool = False,
    ) -> None:
        """`draft_model` draws reflect drafts instead of corrupted renders (self-sampling);
        `mode_succeeds(mode, spec)` labels adaptive trajectories with the cheapest mode that
        succeeds for a model, instead of by complexity level; `describe_critiques` opens every
        critique with `<des>` and what the verifier sees on the canvas, so the verdict follows a
        reading of the image."""
        self.scene, self.rng, self.resolution = scene, rng, resolution
        self.sketch_error_rate = sketch_error_rate
        self.draft_model = draft_model
        self.mode_succeeds = mode_succeeds
        self.verifier = verifier or Verifier()
        self.describe_critiques = describe_critiques

    def begin(self, episode: Episode) -> None:
        episode.trajectory.segments.append(Segment.prompt(episode.spec.prompt))
        episode.state = TeacherState(self.scene)

    def restart(self, episode: Episode) -> None:
        episode.trajectory.segments.append(Segment.restart(episode.spec.prompt))
        episode.state.target, episode.state.step_spec = self.scene, None

    def choose(self, episode: Episode, modes: list[str]) -> str:
        mode = LEVEL_MODES[complexity(episode.spec).level]
        if self.mode_succeeds is not None:
            by_cost = sorted(modes, key=lambda m: MODES.get(m).cost)
            mode = next((m for m in by_cost if self.mode_succeeds(m, episode.spec)), mode)
        if mode not in modes:
            raise ValueError(f"the teacher labels this prompt {mode!r}, which is not among {modes}")
        episode.add_text(mode_token(mode))
        return mode

    def announce(self, episode: Episode, mode: str) -> None:
        episode.add_text(mode_token(mode), loss=False)

    def plan(self, episode: Episode, step: int) -> bool:
        spec = episode.spec
        if step >= len(spec.include):
            return False
        clause = spec.include[step]
        start = sum(c.count for c in spec.include[:step])
        partial = self.scene.subset(range(start + clause.count))
        instruction = plan_instruction(spec, step)
        episode.add_text(f"<ins>{instruction}</ins><des>{describe(partial)}</des>")
        episode.state.target, episode.state.step_spec = partial, partial_spec(spec, step)
        return True

    def draft(self, episode: Episode, role: ImageRole) -> None:
        target = episode.state.target
        if role is ImageRole.DRAFT:
            image = (
                self.draft_model(episode.spec)
                if self.draft_model
                else self._render(self._corrupt(target, episode.spec))
            )
        elif role is ImageRole.SKETCH and self.rng.random() < self.sketch_error_rate:
            image = self._render(self._corrupt(target, episode.state.step_spec))
        else:
            image = self._render(target)
        episode.add_image(image, role)

    def reflect(self, episode: Episode) -> Critique:
        step_spec = episode.state.step_spec
        spec = step_spec or episode.spec
        verdict = self.verifier.verify(episode.image, spec)
        text = critique_text(verdict, spec, OK_STEP if step_spec else OK_IMAGE)
        if self.describe_critiques:
            text = f"<des>{read_canvas(verdict.detections, episode.image.width)}</des>{text}"
        episode.add_text(text)
        return Critique(text, verdict.correct)

    def refine(self, episode: Episode, role: ImageRole) -> None:
        episode.add_image(self._render(episode.state.target), role)

    def finish(self, episode: Episode) -> None:
        episode.trajectory.meta.update(
            spec=episode.spec.to_json(), level=complexity(episode.spec).level
        )

    def _render(self, scene: Scene) -> Image.Image:
        return render(scene, self.resolution)

    def _corrupt(self, scene: Scene, spec: PromptSpec) -> Scene:
        """The scene with one error the verifier catches (wrong color, missing or extra object,
        swapped relation), chosen at random among those the spec can show."""
        options = _corruptions(scene, spec)
        for k in self.rng.permutation(len(options)):
            wrong = options[k](self.rng)
            if wrong is not None and not self.verifier.verify(self._render(wrong), spec).correct:
                return wrong
        return scene.remove(int(self.rng.integers(len(scene))))  # a missing object always shows


def plan_instruction(spec: PromptSpec, step: int) -> str:
    """The teacher's `<ins>` for plan step `step` of `spec` (one step per include clause, in
    order): ``step 2 of 3: add a red circle left of the blue square``."""
    clause = spec.include[step]
    where = ""
    if clause.position is not None:
        relation, target = clause.position
        where = f" {relation} the {name(spec.include[target])}"
    article = "" if clause.count > 1 else ("an " if name(clause)[0] in "aeiou" else "a ")
    return (
        f"step {step + 1} of {len(spec.include)}: add {article}{name(clause, clause.count)}{where}"
    )


def partial_spec(spec: PromptSpec, step: int) -> PromptSpec:
    """What must hold after plan step `step`: the first `step + 1` include clauses, and the
    exclude clauses about their objects."""
    include = spec.include[: step + 1]
    keys = {(c.cls, c.color) for c in include}
    exclude = tuple(c for c in spec.exclude if (c.cls, c.color) in keys)
    return replace(spec, include=include, exclude=exclude)


def _corruptions(scene: Scene, spec: PromptSpec) -> list:
    objects = scene.objects
    colored = [
        i
        for i, o in enumerate(objects)
        if any(c.color == o.color and c.cls == o.shape for c in spec.include if c.color)
    ]
    options = [lambda rng: scene.remove(int(rng.integers(len(objects))))]  # missing object
    if colored:

        def recolor(rng):
            i = int(rng.choice(colored))
            return scene.recolor(i, str(rng.choice([c for c in COLORS if c != objects[i].color])))

        options.append(recolor)
    if spec.exclude:

        def extra(rng):
            clause = spec.exclude[int(rng.integers(len(spec.exclude)))]
            color = clause.color or str(rng.choice(COLORS))
            return _add_free(scene, SceneObject(clause.cls, color, 0.5, 0.5, 0.15), rng)

        options.append(extra)
    if any(c.position for c in spec.include):

        def swap(rng):
            a, b = _related_pair(scene, spec)
            if a is None:
                return None
            oa, ob = objects[a], objects[b]
            return scene.move(a, ob.x, ob.y).move(b, oa.x, oa.y)

        options.append(swap)
    return options


def _related_pair(scene: Scene, spec: PromptSpec):
    starts = np.cumsum([0] + [c.count for c in spec.include])
    for i, clause in enumerate(spec.include):
        if clause.position is not None:
            return int(starts[i]), int(starts[clause.position[1]])
    return None, None


def _add_free(scene: Scene, obj: SceneObject, rng, gap: float = 0.03) -> Scene | None:
    for _ in range(200):
        x, y = rng.uniform(obj.size / 2 + gap, 1 - obj.size / 2 - gap, size=2)
        candidate = replace(obj, x=float(x), y=float(y))
        if all(not _overlap(candidate, o, gap) for o in scene.objects):
            return scene.add(candidate)
    return None


def _overlap(a: SceneObject, b: SceneObject, gap: float) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return ax0 < bx1 + gap and bx0 < ax1 + gap and ay0 < by1 + gap and by0 < ay1 + gap
