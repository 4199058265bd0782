"""Trajectories from the model's own samples: the model draws, the teacher judges and corrects.

`SelfSampleActor` performs a mode's steps inside the model's own KV-cached session, so every image
is drawn in the context it will have at inference: the prompt, the mode token, the plan so far,
earlier images. The text is the teacher's (`ShapeWorldTeacher`): the mode label, plan steps, and
critiques that are the verifier's exact judgement of the image the model just drew. A wrong image
is corrected by an edit of itself (`avr.world.edit`: the scene the verifier detects in it, with
exactly the critique's edits applied, rendered), so a refine learns to edit rather than redraw.

The flow loss never trains an image the verifier rejects: the model's wrong drafts and sketches are
read as context (`Segment.loss = False`), its right ones are trained (rejection-sampling fine-tuning
on its own successes), and a wrong direct answer is replaced by the teacher's render.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from avr.data.teacher import ShapeWorldTeacher
from avr.policy import PolicyActor, PolicyState, SamplingConfig
from avr.protocol import Critique, Episode
from avr.sequence import ImageRole, Segment, Trajectory
from avr.world.edit import correct_scene, detected_scene
from avr.world.render import render
from avr.world.scene import Scene
from avr.world.spec import PromptSpec

#: Images that are a first try at what the text before them asks (not a refine of an earlier one).
FIRST_TRIES = (ImageRole.DRAFT, ImageRole.SKETCH)


@dataclass
class SelfSampleState(PolicyState):
    """A `PolicyState` with what the teacher keeps (`TeacherState`'s fields): the teacher's steps
    run on the same episode."""

    target: Scene | None = None
    step_spec: PromptSpec | None = None


class SelfSampleActor(PolicyActor):
    """The model draws every image; `teacher` writes every text and corrects wrong images.

    Each episode records in its trajectory's meta how many images the model drew
    (`model_images`), how many the verifier accepted (`model_images_right`), the verdicts its
    critiques state in order (`critiques`: True for "right"), and how each refine was made
    (`refine_targets`: drawn by the "model", an "edit" of the image, or a "redraw" of the
    teacher's scene where no edit of the image satisfies the spec)."""

    State = SelfSampleState

    def __init__(
        self,
        model,
        sampling: SamplingConfig,
        generator: torch.Generator,
        open_session: Callable[[], Any],
        teacher: ShapeWorldTeacher,
        own_refines: int = 1,
    ) -> None:
        """`own_refines`: how many refines of a reflect trajectory the model draws itself (judged
        and critiqued like a draft) before the teacher's edit corrects the image: later critiques
        then judge the model's own refines, right and wrong, not only corrected ones."""
        super().__init__(model, sampling, generator, open_session=open_session)
        self.teacher, self.own_refines = teacher, own_refines

    def begin(self, episode: Episode) -> None:
        super().begin(episode)
        episode.state.target = self.teacher.scene
        episode.trajectory.meta.update(
            model_images=0, model_images_right=0, critiques=[], refine_targets=[]
        )

    def restart(self, episode: Episode) -> None:
        super().restart(episode)
        episode.state.target, episode.state.step_spec = self.teacher.scene, None

    def choose(self, episode: Episode, modes: list[str]) -> str:
        mode = self.teacher.choose(episode, modes)
        self._read_text(episode)
        return mode

    def announce(self, episode: Episode, mode: str) -> None:
        self.teacher.announce(episode, mode)
        self._read_text(episode)

    def plan(self, episode: Episode, step: int) -> bool:
        if not self.teacher.plan(episode, step):
            return False
        self._read_text(episode)
        return True

    def draft(self, episode: Episode, role: ImageRole) -> None:
        """The model draws; the image is trained only when the verifier accepts it. A wrong final
        answer (direct) becomes the teacher's render of the target."""
        self._image(episode, role)
        segment = episode.trajectory.segments[-1]
        right = self.teacher.verifier.verify(segment.image, self._spec(episode)).correct
        meta = episode.trajectory.meta
        meta["model_images"] += 1
        meta["model_images_right"] += int(right)
        segment.loss = right
        segment.meta["drawn_by"] = "model"
        if role is ImageRole.FINAL and not right:
            segment.image = episode.image = render(episode.state.target, self.teacher.resolution)
            segment.loss, segment.meta["drawn_by"] = True, "teacher"

    def reflect(self, episode: Episode) -> Critique:
        """The teacher's critique of the image in front of the model; its segment's meta records
        the verdict, who drew the image it judges and whether that image is a first try (a draft
        or a plan step's sketch) or a refine (`critique_views` reads it)."""
        critique = self.teacher.reflect(episode)
        self._read_text(episode)
        episode.trajectory.meta["critiques"].append(critique.ok)
        judged = next(s for s in reversed(episode.trajectory.segments) if s.is_image)
        episode.trajectory.segments[-1].meta["critique"] = {
            "ok": critique.ok,
            "of": judged.meta.get("drawn_by", "teacher"),
            "position": "first" if judged.role in FIRST_TRIES else "later",
        }
        return critique

    def refine(self, episode: Episode, role: ImageRole) -> None:
        """The model's own refine (reflect's first `own_refines`), or the edit of the current
        image that the critique asks for, rendered and read."""
        targets = episode.trajectory.meta["refine_targets"]
        if role is ImageRole.REFINED and len(targets) < self.own_refines:
            targets.append("model")
            self.draft(episode, role)
            return
        spec, teacher = self._spec(episode), self.teacher
        verdict = teacher.verifier.verify(episode.image, spec)
        scene = correct_scene(
            detected_scene(verdict.detections, episode.image.width),
            spec,
            teacher.rng,
            teacher.resolution,
            teacher.verifier,
        )
        kind = "edit" if scene is not None else "redraw"
        image = render(scene if scene is not None else episode.state.target, teacher.resolution)
        episode.add_image(image, role)
        episode.trajectory.segments[-1].meta["drawn_by"] = "teacher"
        episode.trajectory.meta["refine_targets"].append(kind)
        self._append_image(episode, image)

    def finish(self, episode: Episode) -> None:
        super().finish(episode)
        self.teacher.finish(episode)

    def _spec(self, episode: Episode):
        return episode.state.step_spec or episode.spec

    def _read_text(self, episode: Episode) -> None:
        """The session reads the text segment the teacher just wrote."""
        episode.state.session.append_text([episode.trajectory.segments[-1].text])


def critique_views(trajectory: Trajectory) -> list[Trajectory]:
    """One trajectory per critique of an image the model drew: `trajectory` up to and including
    that critique, in which only the critique is trained (every other segment is read). A critic
    learned from views balanced per position and verdict (`SelfSampleStats.balance_views`) cannot
    read its verdict off the position: in a whole reflect trajectory the critique after the
    teacher's corrected image always says "right". Each view's meta is the trajectory's with
    `view`: the critique's `position` ("first" or "later") and `ok`."""
    views = []
    for k, segment in enumerate(trajectory.segments):
        critique = segment.meta.get("critique")
        if segment.is_image or critique is None or critique["of"] != "model":
            continue
        segments = [
            Segment(text=s.text, image=s.image, role=s.role, loss=False, meta=dict(s.meta))
            for s in trajectory.segments[:k]
        ]
        segments.append(Segment(text=segment.text, loss=True, meta=dict(segment.meta)))
        meta = {**trajectory.meta, "view": {"position": critique["position"], "ok": critique["ok"]}}
        views.append(Trajectory(segments, meta))
    return views


def without_critique_loss(trajectory: Trajectory) -> Trajectory:
    """`trajectory` with its critiques read, not trained (they are learned from balanced views)."""
    for segment in trajectory.segments:
        if "critique" in segment.meta:
            segment.loss = False
    return trajectory
