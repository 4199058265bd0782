"""`avr.Pipeline`: a trained model, from a prompt to its image, in three lines.

    from avr import Pipeline
    pipe = Pipeline.from_pretrained("shapeworld-tiny-self")
    out = pipe("a red circle left of a blue square", mode="adaptive")
    out.images[0].save("circle.png")

The pipeline wraps the rollout engine (`avr.rollout`) and the mode registry, so a mode runs here
exactly as it runs in `avr evaluate` and in RL: the same prompt, mode, settings and seed give the
same image. `out.trajectories` hold every plan, critique and intermediate image; `out.verify()`
judges the images with the ShapeWorld verifier where the prompt parses (`avr.world.parse`).
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from avr.backbone import from_pretrained
from avr.backbone.io import resolve_model_dir
from avr.cards import GENERATION_DEFAULTS, read_generation_config
from avr.policy import SamplingConfig
from avr.protocol import Mode
from avr.registry import MODES
from avr.rollout import Job, rollout
from avr.sequence import Trajectory
from avr.world.parse import parse_prompt
from avr.world.spec import PromptSpec
from avr.world.verify import Verdict, Verifier


@dataclass
class PipelineOutput:
    """What a call made, one entry per image (prompt-major: every image of the first prompt, then
    of the next)."""

    images: list[Image.Image]
    """The final image of each trajectory."""
    trajectories: list[Trajectory]
    """The whole trajectories: text segments (mode token, plans, critiques) and every image."""
    prompts: list[str]
    specs: list[PromptSpec | None]
    """What the verifier judges each image against (None: the prompt did not parse)."""
    nfe: list[int]
    """Velocity evaluations each trajectory spent (classifier-free guidance counts twice)."""
    text_tokens: list[int]
    """Text tokens each trajectory wrote."""
    seconds: float
    """Wall time of the whole call."""

    def verify(self, verifier: Verifier | None = None) -> list[Verdict | None]:
        """The verifier's judgement of each final image (None where the prompt did not parse)."""
        verifier = verifier or Verifier()
        return [
            None if spec is None else verifier.verify(image, spec)
            for image, spec in zip(self.images, self.specs, strict=True)
        ]


class Pipeline:
    """Generate with a trained model: `Pipeline(model)` or `Pipeline.from_pretrained(path)`.
    `defaults` are the sampler settings a call uses where it names none (`avr.cards`: the model
    folder's `generation_config.json`, else ODE, 10 steps, greedy text, no guidance)."""

    def __init__(self, model, defaults: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.defaults = {**GENERATION_DEFAULTS, **(defaults or {})}

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **kwargs) -> Pipeline:
        """Load a model folder, a shipped model by name (`shapeworld-tiny-self`) or any folder
        `avr.backbone.from_pretrained` reads (BAGEL's layout, a Janus folder), with its
        `generation_config.json` as the defaults; `kwargs` go to the loader (`dtype="bfloat16"`)."""
        folder = resolve_model_dir(path_or_name)
        return cls(from_pretrained(folder, **kwargs), read_generation_config(folder))

    def __call__(
        self,
        prompt: str | Sequence[str],
        mode: str | Mode | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        temperature: float | None = None,
        max_text_tokens: int | None = None,
        shift: float | None = None,
        batch_size: int = 32,
    ) -> PipelineOutput:
        """Roll `mode` (a registered name or a `Mode`) out on each prompt, `num_images_per_prompt`
        times. Image `j` (prompt-major) is episode `seed + j`, so the first image of a prompt
        equals `avr evaluate`'s for that prompt at index 0 with `--seed seed`. Text is greedy at
        `temperature` 0; images come from the ODE with `num_inference_steps` steps, time shift
        `shift` and classifier-free guidance `guidance_scale` (1: none); `batch_size` episodes run
        together. A setting left None is the pipeline's default (`self.defaults`)."""
        given = {
            "mode": mode,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "max_text_tokens": max_text_tokens,
            "shift": shift,
        }
        use = {k: self.defaults[k] if v is None else v for k, v in given.items()}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompt: expected a non-empty string or list of them, got {prompt!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected ≥ 1, got {num_images_per_prompt}")
        runner = MODES.get(use["mode"])() if isinstance(use["mode"], str) else use["mode"]
        sampling = SamplingConfig(
            max_text_tokens=use["max_text_tokens"],
            temperature=use["temperature"],
            steps=use["num_inference_steps"],
            cfg_scale=use["guidance_scale"],
            shift=use["shift"],
        )
        parsed = [parse_prompt(p) for p in prompts]
        specs = [s or PromptSpec("free", p, ()) for p, s in zip(prompts, parsed, strict=True)]
        repeat = num_images_per_prompt
        each = [spec for spec in specs for _ in range(repeat)]
        jobs = [Job(runner, spec, seed + j) for j, spec in enumerate(each)]
        start = time.perf_counter()
        trajectories = rollout(self.model, jobs, sampling, batch_size)
        seconds = time.perf_counter() - start
        for trajectory, job in zip(trajectories, jobs, strict=True):
            trajectory.meta.setdefault("prompt", job.spec.prompt)
        side = self.model.config.image_size
        blank = Image.new("RGB", (side, side), "white")  # a rollout that drew nothing
        return PipelineOutput(
            images=[t.final_image or blank for t in trajectories],
            trajectories=trajectories,
            prompts=[p for p in prompts for _ in range(repeat)],
            specs=[s for s in parsed for _ in range(repeat)],
            nfe=[int(t.meta.get("nfe", 0)) for t in trajectories],
            text_tokens=[int(t.meta.get("text_tokens", 0)) for t in trajectories],
            seconds=seconds,
        )


def trajectory_strip(trajectory: Trajectory, verdict: Verdict | None = None) -> Figure:
    """One row: every image of `trajectory` in order, titled by its role, with the text written
    before it (mode token, plan step, critique) beneath; then the text after the last image and,
    where given, the verifier's verdict on the final image."""
    columns: list[tuple[Image.Image, str, str]] = []
    text: list[str] = []
    for segment in trajectory.segments[1:]:  # the prompt is the figure's title
        if segment.is_image:
            columns.append((segment.image, segment.role.value, " ".join(text)))
            text = []
        else:
            text.append(segment.text.replace("<|eos|>", "").strip())
    last = " ".join(text)
    if verdict is not None:
        last += "\n\nverifier: " + ("right" if verdict.correct else f"wrong ({verdict.reason})")
    fig = Figure(figsize=(2.0 * (len(columns) + 1), 3.2), layout="constrained")
    fig.suptitle(trajectory.segments[0].text, fontsize=9)
    axes = fig.subplots(1, len(columns) + 1, squeeze=False)[0]
    for ax, (image, title, words) in zip(axes, columns, strict=False):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("\n".join(textwrap.wrap(words, 34)[:8]), fontsize=6)
    axes[-1].axis("off")
    wrapped = "\n".join(
        line for part in last.split("\n") for line in textwrap.wrap(part, 34) or [""]
    )
    axes[-1].text(0, 0.5, wrapped, fontsize=7, va="center", transform=axes[-1].transAxes)
    return fig
