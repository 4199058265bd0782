"""The project's one trajectory type: SFT data, RL rollouts and evaluation output alike.

A `Trajectory` is an ordered list of `Segment`s, each text or image. Text segments say whether the
model is trained to write them (`loss`); image segments carry their role: an `input` image is only
read, every other role (`draft`, `sketch`, `refined`, `final`) is something the model drew, so in
training it is a generation target. Sampled segments may carry the log-probs RL needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from PIL import Image


class ImageRole(StrEnum):
    """What an image is in a trajectory."""

    INPUT = "input"  # given to the model (an image to edit or judge); never generated
    DRAFT = "draft"  # a first attempt that a reflection critiques
    SKETCH = "sketch"  # a plan step's partial image
    REFINED = "refined"  # an image after a `<refine>` edit
    FINAL = "final"  # the answer

    @property
    def generated(self) -> bool:
        """Whether the model draws images of this role (and so learns to, in SFT)."""
        return self is not ImageRole.INPUT


@dataclass
class Segment:
    """One text or image piece of a trajectory.

    Exactly one of `text` / `image` is set. `loss` marks text the model is trained to write (the
    prompt is read, not written). `logprobs` holds per-token (text) or per-step (image) log-probs
    of a sampled segment; `meta` holds anything a mode wants to keep (a plan step's scene, say).
    """

    text: str | None = None
    image: Image.Image | None = None
    role: ImageRole | None = None
    loss: bool = True
    logprobs: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ValueError("a segment holds exactly one of text or image")
        if self.image is not None:
            if self.role is None:
                raise ValueError(
                    "an image segment needs a role (input, draft, sketch, refined, final)"
                )
            self.role = ImageRole(self.role)
        elif self.role is not None:
            raise ValueError(f"a text segment has no image role, got {self.role!r}")

    @property
    def is_image(self) -> bool:
        """True for an image segment."""
        return self.image is not None

    @classmethod
    def prompt(cls, text: str) -> Segment:
        """A text segment the model reads but is not trained to write."""
        return cls(text=text, loss=False)


@dataclass
class Trajectory:
    """An ordered list of segments with the sample's metadata (its spec, mode, level, …)."""

    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[Segment]:
        """The image segments, in order."""
        return [s for s in self.segments if s.is_image]

    @property
    def final_image(self) -> Image.Image | None:
        """The last image the trajectory holds (the answer), or None."""
        images = self.images
        return images[-1].image if images else None


def image_to_array(image: Image.Image, resolution: int) -> np.ndarray:
    """An RGB image as `[H, W, 3]` float32 in [0, 1], checked against the expected resolution."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    if image.size != (resolution, resolution):
        raise ValueError(
            f"expected a {resolution}×{resolution} image, got {image.size[0]}×{image.size[1]}"
        )
    return np.asarray(image, dtype=np.float32) / 255.0
