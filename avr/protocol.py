"""The mode protocol: a mode is control flow over four steps, `plan`, `draft`, `reflect`, `refine`.

Who performs a step is an `Actor`:

- the **teacher** (`avr.teacher.ShapeWorldTeacher`) knows the target scene: it writes plans from it,
  draws renders (drafts with realistic errors, partial sketches), critiques with the verifier and
  refines by editing the scene. `Mode.build(sample)` runs the mode with it: an SFT trajectory.
- the **policy** (`avr.policy.PolicyActor`) is the unified model: its steps sample text and images
  from the backbone, keeping log-probs. `Mode.rollout(policy, spec)` runs the mode with it.

One control flow, two actors: what a mode writes for SFT is exactly what it asks of the policy in RL.
Each step appends segments to an `Episode` and returns what the control flow branches on.

Lifecycle of a trajectory: `begin` (the prompt) → `announce` (the mode token of a mode run
directly; `adaptive` lets the actor `choose` one instead) → `run` → `finish`. The default `run`,
which `direct` and `reflect` use: `plan` (nothing by default) → `draft` → up to `rounds` ×
(`reflect` → stop if right → `refine`). A mode may `restart` the context for another try (`retry`):
the actor opens a fresh context holding only the prompt, and the trajectory keeps every try.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from PIL import Image

from avr.sequence import ImageRole, Segment, Trajectory
from avr.world.spec import PromptSpec

if TYPE_CHECKING:  # annotations only
    from avr.backbone.generation import ImageSample, TextSample


@dataclass
class Critique:
    """A reflection: its text (a verdict, or what is wrong plus a `<refine>` edit) and whether it
    judges the image right."""

    text: str
    ok: bool


@dataclass
class Episode:
    """A trajectory under construction: the prompt's spec, the segments so far, and the current
    image (the one the next `reflect` judges). `state` is the actor's own record of the episode,
    set by its `begin` (`avr.policy.PolicyState`, `avr.data.teacher.TeacherState`)."""

    spec: PromptSpec
    trajectory: Trajectory = field(default_factory=lambda: Trajectory([]))
    image: Image.Image | None = None
    state: Any = None

    def add_text(
        self,
        text: str,
        sample: TextSample | None = None,
        logprobs: list[float] | None = None,
        loss: bool = True,
    ) -> None:
        """Append text the model writes (sampled: the sampler's output and per-token log-probs;
        `loss=False`: text the model reads and is not trained to write)."""
        segment = Segment(text=text, logprobs=logprobs, loss=loss)
        segment.sample = sample
        self.trajectory.segments.append(segment)

    def add_image(
        self,
        image: Image.Image,
        role: ImageRole,
        sample: ImageSample | None = None,
        logprobs: list[float] | None = None,
    ) -> None:
        """Append an image the model draws (sampled: per-step log-probs); it becomes current."""
        segment = Segment(image=image, role=role, logprobs=logprobs)
        segment.sample = sample
        self.trajectory.segments.append(segment)
        self.image = image


class Actor(Protocol):
    """Who performs the steps (the teacher or the policy). Every method appends to `episode`."""

    def begin(self, episode: Episode) -> None:
        """Start the trajectory: the prompt."""

    def choose(self, episode: Episode, modes: list[str]) -> str:
        """Pick a mode name (adaptive): the teacher's label, or the policy's sampled mode token."""

    def announce(self, episode: Episode, mode: str) -> None:
        """Write the mode token of a mode that was given, not chosen (a forced mode): read, never
        trained or sampled, so a forced rollout sees the context an adaptive one would."""

    def plan(self, episode: Episode, step: int) -> bool:
        """Write plan step `step` (`<ins>…</ins><des>…</des>`); False when the plan has no such step."""

    def draft(self, episode: Episode, role: ImageRole) -> None:
        """Draw an image of `role` from the context so far."""

    def reflect(self, episode: Episode) -> Critique:
        """Critique the current image against the prompt (or against the plan step, after a sketch)."""

    def refine(self, episode: Episode, role: ImageRole) -> None:
        """Draw the edited image the last critique's `<refine>` asks for."""

    def restart(self, episode: Episode) -> None:
        """Open a fresh context for another try: the prompt again (`Segment.restart`), and nothing
        of the tries before it in what the model sees; the trajectory keeps them all."""

    def finish(self, episode: Episode) -> None:
        """End the trajectory (record its compute, say)."""


class Mode(ABC):
    """A mode plugin: control flow over the actor's four steps. Subclasses register with
    `@avr.registry.register_mode(name)`; `draft` is the one step every mode must define."""

    name: ClassVar[str] = "mode"
    #: Relative cost used to pick the cheapest successful mode (adaptive labels); lower is cheaper.
    cost: ClassVar[int] = 0
    #: Whether a trajectory of this mode starts with its mode token (`Actor.announce`) when the mode
    #: is run directly; a mode that picks another one (adaptive) writes the chosen token instead.
    announced: ClassVar[bool] = True
    #: The mode token its trajectories open with, where not its own name (a mode that lays each
    #: try out as another mode's trajectory: `retry` as `reflect`'s).
    token: ClassVar[str | None] = None
    #: Whether its trajectories can be trained on (SFT data, RL rollouts): False for a mode whose
    #: trajectories hold several contexts (`retry`), which training cannot lay out as one.
    trainable: ClassVar[bool] = True

    def __init__(self, rounds: int = 0) -> None:
        """`rounds`: how many reflect → refine rounds the default `run` allows."""
        if rounds < 0:
            raise ValueError(f"rounds must be ≥ 0, got {rounds}")
        self.rounds = rounds

    # ---- entry points -----------------------------------------------------------------------

    def build(self, teacher: Actor, spec: PromptSpec) -> Trajectory:
        """A teacher trajectory for SFT (the teacher holds the sample's target scene)."""
        return self._start(teacher, spec)

    def rollout(self, policy: Actor, spec: PromptSpec) -> Trajectory:
        """A policy trajectory for RL or evaluation; sampled segments carry their log-probs."""
        return self._start(policy, spec)

    def _start(self, actor: Actor, spec: PromptSpec) -> Trajectory:
        episode = Episode(spec)
        actor.begin(episode)
        if self.announced:
            actor.announce(episode, self.token or self.name)
        self.run(actor, episode)
        actor.finish(episode)
        episode.trajectory.meta.setdefault("mode", self.name)
        return episode.trajectory

    def run(self, actor: Actor, episode: Episode) -> None:
        """The control flow (see the module docstring); override for another shape."""
        self.plan(actor, episode)
        self.draft(actor, episode)
        for _ in range(self.rounds):
            critique = self.reflect(actor, episode)
            if critique.ok:
                return
            self.refine(actor, episode)
        if self.rounds:
            self.reflect(
                actor, episode
            )  # the last refinement is judged too: the trajectory ends on a verdict

    # ---- the four steps ---------------------------------------------------------------------

    def plan(self, actor: Actor, episode: Episode) -> None:  # noqa: B027 - a default, not abstract
        """Plan before drawing: nothing by default."""

    @abstractmethod
    def draft(self, actor: Actor, episode: Episode) -> None:
        """Draw the first image (its role says what it is: a final answer, a draft, a sketch)."""

    def reflect(self, actor: Actor, episode: Episode) -> Critique:
        """Critique the current image."""
        return actor.reflect(episode)

    def refine(self, actor: Actor, episode: Episode) -> None:
        """Redraw the current image as the critique asks."""
        actor.refine(episode, ImageRole.REFINED)
