"""Does the image generator use its prompt? Measurements, and a ladder of toy tasks.

- `sample_direct`: draw one image per prompt in `direct` mode (`<bos> prompt <mode:direct> <img>`)
  through the rollout engine, with the ODE sampler and an evaluation's seeds (`sample_copy` after
  an input image, `ReadThenDraw`);
- `prompt_fidelity`: those images judged by the verifier, as `avr.world.fidelity.Fidelity` ratios
  (colour and shape precision, objects per image, exact scenes);
- `shuffled_loss_ratio`: the teacher-forced image flow loss of direct trajectories with their
  prompts shuffled, over the loss with the right prompts, at the same noise and timesteps. A
  generator that ignores its prompt scores 1; positions are random in ShapeWorld, so even a perfect
  model's ratio stays modest on real prompts (it is a trend diagnostic);
- `context_loss_ratio`: the same for the images a trajectory drew before its last one: the
  refined image's flow loss after another trajectory's draft, over the loss after its own. The
  teacher's refinement keeps the draft's layout, so a model that edits (copies what was right from
  the clean latent context) scores well above 1; one that draws each image anew scores 1;
- `copy_error`, `swapped_input_loss`: does the model redraw an image it has just read (what an
  edit needs first; the last rung of the ladder, `avr.research.ladder`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from avr.backbone import UnifiedLoss, pack
from avr.backbone.model import UnifiedModel, require_unified
from avr.backbone.packing import FlowSettings
from avr.backbone.protocol import Backbone
from avr.backbone.tokenizer import mode_token
from avr.policy import SamplingConfig
from avr.protocol import Mode
from avr.registry import MODES
from avr.rollout import Job, rollout, rollout_seed
from avr.sequence import ImageRole, Segment, Trajectory
from avr.world import (
    PromptSpec,
    Scene,
    Verifier,
    render,
)
from avr.world.fidelity import Fidelity


def direct_trajectory(spec: PromptSpec, scene: Scene, resolution: int) -> Trajectory:
    """The direct mode's SFT trajectory: prompt, `<mode:direct>`, the rendered scene."""
    return Trajectory(
        [
            Segment.prompt(spec.prompt),
            Segment(text=mode_token("direct"), loss=True),
            Segment(image=render(scene, resolution), role=ImageRole.FINAL),
        ]
    )


def copy_trajectory(spec: PromptSpec, scene: Scene, resolution: int) -> Trajectory:
    """The copy rung's trajectory: prompt, the rendered scene read as an input image,
    `<mode:direct>`, the same render to draw (so every pixel of the target is in the context)."""
    image = render(scene, resolution)
    return Trajectory(
        [
            Segment.prompt(spec.prompt),
            Segment(image=image, role=ImageRole.INPUT),
            Segment(text=mode_token("direct"), loss=True),
            Segment(image=image, role=ImageRole.FINAL),
        ]
    )


def sample_direct(
    model: Backbone,
    specs: Sequence[PromptSpec],
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """One image per prompt `[B, H, W, 3]` (uint8), rolled out in `direct` mode (`<bos> prompt
    <mode:direct> <img>`) by the rollout engine with the ODE sampler; prompt `i`'s noise comes
    from `avr.rollout.rollout_seed(seed, i)`, as an evaluation's does."""
    return _sample(model, [MODES.get("direct")() for _ in specs], specs, steps, seed, batch_size)


def sample_copy(
    model: Backbone,
    specs: Sequence[PromptSpec],
    inputs: np.ndarray,
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """One image per prompt `[B, H, W, 3]` (uint8) drawn after `<bos> prompt <img>input</img>
    <mode:direct>` (`copy_trajectory`'s context), rolled out like `sample_direct`; `inputs`
    `[B, H, W, 3]` uint8."""
    if len(inputs) != len(specs):
        raise ValueError(
            f"sample_copy needs one input per prompt, got {len(inputs)} for {len(specs)}"
        )
    modes = [ReadThenDraw(Image.fromarray(np.asarray(x, np.uint8), "RGB")) for x in inputs]
    return _sample(model, modes, specs, steps, seed, batch_size)


class ReadThenDraw(Mode):
    """The copy rung's rollout: the prompt, `image` read as an input (`PolicyActor.read`), the
    direct mode's token, one image drawn."""

    name = "direct"
    announced = False  # its token comes after the input image

    def __init__(self, image: Image.Image) -> None:
        super().__init__()
        self.image = image

    def run(self, actor, episode) -> None:
        actor.read(episode, self.image)
        actor.announce(episode, "direct")
        self.draft(actor, episode)

    def draft(self, actor, episode) -> None:
        actor.draft(episode, ImageRole.FINAL)


def _sample(
    model: Backbone, modes: Sequence[Mode], specs, steps: int, seed: int, batch_size: int
) -> np.ndarray:
    """Roll out `modes[i]` on `specs[i]` (greedy text, the ODE with `steps`) in eval mode; the
    final images as uint8 `[B, H, W, 3]`."""
    was_training = model.training
    model.eval()
    jobs = [
        Job(m, s, rollout_seed(seed, i)) for i, (m, s) in enumerate(zip(modes, specs, strict=True))
    ]
    try:
        trajectories = rollout(
            model, jobs, SamplingConfig(steps=steps, temperature=0.0), batch_size
        )
    finally:
        model.train(was_training)
    return np.stack([np.asarray(t.final_image, np.uint8) for t in trajectories])


def copy_error(
    model: Backbone,
    specs: Sequence[PromptSpec],
    scenes: Sequence[Scene],
    steps: int = 10,
    seed: int = 0,
) -> tuple[float, float, np.ndarray]:
    """How closely the model redraws an image it has read: the mean absolute pixel difference
    (0–1) between each `sample_copy` image and its own input, and between it and the next
    scene's input (cyclically: what an image that ignores its input scores); returns
    (own, other, images). A model that copies has own ≪ other; one that ignores its input,
    own ≈ other."""
    if len(scenes) < 2:
        raise ValueError("copy_error needs at least two scenes")
    side = model.config.image_size
    inputs = np.stack([np.asarray(render(s, side)) for s in scenes])
    drawn = sample_copy(model, specs, inputs, steps, seed)
    diff = np.abs(drawn.astype(np.float32) - inputs.astype(np.float32)) / 255
    other = np.abs(drawn.astype(np.float32) - np.roll(inputs, -1, 0).astype(np.float32)) / 255
    return float(diff.mean()), float(other.mean()), drawn


def prompt_fidelity(
    model: Backbone,
    specs: Sequence[PromptSpec],
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[dict[str, float], np.ndarray]:
    """`Fidelity` ratios of direct samples for `specs`, and the images themselves."""
    images = sample_direct(model, specs, steps, seed, batch_size)
    return judge(images, specs), images


def judge(images: np.ndarray, specs: Sequence[PromptSpec]) -> dict[str, float]:
    """`Fidelity` ratios of `images` `[B, H, W, 3]` (uint8) against their `specs`."""
    verifier = Verifier()
    pairs = zip(images, specs, strict=True)
    return Fidelity().extend((verifier.verify(im, s), s) for im, s in pairs).summary()


@torch.no_grad()
def shuffled_loss_ratio(
    model: UnifiedModel, specs: Sequence[PromptSpec], scenes: Sequence[Scene], seed: int = 0
) -> tuple[float, float]:
    """Image flow loss of direct trajectories with the right prompts and with the prompts
    shuffled (a derangement), at the same noise and timesteps; returns (right, shuffled)."""
    require_unified(model, "avr.conditioning.shuffled_loss_ratio")
    shifted = _other_prompts(specs)
    side = model.config.image_size
    losses = [
        _image_loss(
            model,
            [direct_trajectory(p, s, side) for p, s in zip(prompts, scenes, strict=True)],
            seed,
        )
        for prompts in (specs, shifted)
    ]
    return losses[0], losses[1]


@torch.no_grad()
def context_loss_ratio(
    model: UnifiedModel,
    specs: Sequence[PromptSpec],
    scenes: Sequence[Scene],
    seed: int = 0,
    mode: str = "reflect",
) -> tuple[float, float]:
    """Flow loss of each `mode` teacher trajectory's last image after its own earlier images and
    after another trajectory's (the next one with as many, cyclically), at the same noise and
    timesteps; returns (own, other). Earlier images are read, not trained, so the loss is the last
    image's alone."""
    require_unified(model, "avr.conditioning.context_loss_ratio")
    from avr.data.teacher import ShapeWorldTeacher
    from avr.registry import MODES

    side = model.config.image_size
    built = []
    for i, (spec, scene) in enumerate(zip(specs, scenes, strict=True)):
        teacher = ShapeWorldTeacher(scene, np.random.default_rng([seed, i]), side)
        trajectory = MODES.get(mode)().build(teacher, spec)
        images = [s for s in trajectory.segments if s.is_image]
        if len(images) < 2:
            continue
        for segment in images[:-1]:
            segment.role = ImageRole.INPUT
        built.append(trajectory)
    swapped = _with_others_earlier_images(built, f"context_loss_ratio needs two {mode}")
    return _image_loss(model, built, seed), _image_loss(model, swapped, seed)


@torch.no_grad()
def swapped_input_loss(
    model: UnifiedModel, specs: Sequence[PromptSpec], scenes: Sequence[Scene], seed: int = 0
) -> tuple[float, float]:
    """Image flow loss of `copy_trajectory`s with their own input image and with the next
    scene's (cyclically; prompt and target kept), at the same noise and timesteps; returns
    (own, swapped). A model that copies what it reads has swapped ≫ own."""
    require_unified(model, "avr.conditioning.swapped_input_loss")
    side = model.config.image_size
    own = [copy_trajectory(p, s, side) for p, s in zip(specs, scenes, strict=True)]
    swapped = _with_others_earlier_images(own, "swapped_input_loss needs two copy")
    return _image_loss(model, own, seed), _image_loss(model, swapped, seed)


def _with_others_earlier_images(trajectories: Sequence[Trajectory], needs: str) -> list[Trajectory]:
    """Each trajectory with every image before its last replaced by the same-placed image of the
    next trajectory (cyclically) that has as many; the last image, text and meta kept. `needs`
    starts the error raised when a trajectory has no such donor."""
    earlier = [[k for k, s in enumerate(t.segments) if s.is_image][:-1] for t in trajectories]
    n = len(trajectories)
    swapped = []
    for i, trajectory in enumerate(trajectories):
        donor = next(
            ((i + k) % n for k in range(1, n) if len(earlier[(i + k) % n]) == len(earlier[i])),
            None,
        )
        if donor is None:
            raise ValueError(f"{needs} trajectories with as many images")
        segments = list(trajectory.segments)
        for own, other in zip(earlier[i], earlier[donor], strict=True):
            image = trajectories[donor].segments[other].image
            segments[own] = Segment(image=image, role=ImageRole.INPUT)
        swapped.append(Trajectory(segments, trajectory.meta))
    return swapped


def _image_loss(model: UnifiedModel, trajectories: Sequence[Trajectory], seed: int) -> float:
    """Teacher-forced image flow loss of `trajectories` (no CFG dropout; noise from `seed`)."""
    was_training = model.training
    model.eval()
    settings = model.flow_settings
    flow = FlowSettings(settings.timestep_mean, settings.timestep_std, settings.timestep_shift, 0.0)
    seeds = [seed + i for i in range(len(trajectories))]
    batch = pack(
        trajectories, model.tokenizer, model.geometry, model.config.max_seq_len, seeds, flow
    )
    _, stats = UnifiedLoss()(model(batch.to(next(model.parameters()).device)))
    model.train(was_training)
    return float(stats["loss/image"])


def _other_prompts(specs: Sequence[PromptSpec]) -> list[PromptSpec]:
    """For each spec, the next one (cyclically) whose prompt text differs from it."""
    n = len(specs)
    out = []
    for i, spec in enumerate(specs):
        other = next(
            (specs[(i + k) % n] for k in range(1, n) if specs[(i + k) % n].prompt != spec.prompt),
            None,
        )
        if other is None:
            raise ValueError("shuffled_loss_ratio needs at least two different prompts")
        out.append(other)
    return out
