"""The project's one trajectory type: SFT data, RL rollouts and evaluation output alike.

A `Trajectory` is an ordered list of `Segment`s, each text or image. Text segments say whether the
model is trained to write them (`loss`); image segments carry their role: an `input` image is only
read, every other role (`draft`, `sketch`, `refined`, `final`) is something the model drew, so in
training it is a generation target. Sampled segments may carry the log-probs RL needs.

A trajectory may hold several **tries**, each in a fresh context (a `retry` rollout): a try after the
first opens with the prompt again (`Segment.restart`), and the model drawing it saw nothing of the
tries before. `tries` splits such a trajectory into one trajectory per context; training lays out
one context at a time.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # annotations only: the backbone imports this module
    from avr.backbone.generation import ImageSample, TextSample

#: Paired tags a text segment may hold; each must be closed in the same segment, in order.
TAG_PAIRS: tuple[tuple[str, str], ...] = (
    ("<ins>", "</ins>"),
    ("<des>", "</des>"),
    ("<refine>", "</refine>"),
)
_TAG = re.compile(r"</?(?:ins|des|refine)>")
FORMAT_VERSION = 1
RESTART = "restart"  # a segment's meta key: it opens a fresh context (`tries`)


class TrajectoryError(ValueError):
    """A trajectory record that cannot be read; the message names file:line and what is wrong."""


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
    sample: TextSample | ImageSample | None = field(default=None, repr=False, compare=False)
    """In memory only, never written: the sampler's full output (the sampled token ids of a text,
    an image's latents path), for the replay to read what was sampled."""
    behaviour_logprobs: list[float] | None = field(default=None, repr=False, compare=False)
    """In memory only: per-token log-probs under the distribution the text was drawn from, where
    that was not the policy's (an explored mode token, `SamplingConfig.mode_temperature`)."""

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

    @classmethod
    def restart(cls, text: str) -> Segment:
        """The prompt again, opening another try in a fresh context (see `tries`)."""
        return cls(text=text, loss=False, meta={RESTART: True})

    @property
    def restarts(self) -> bool:
        """Whether this segment opens a fresh context."""
        return bool(self.meta.get(RESTART))


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


def tries(trajectory: Trajectory) -> list[Trajectory]:
    """`trajectory` split where a segment `restarts` the context: one trajectory per try, each
    with the whole trajectory's meta (a trajectory of one context gives itself back)."""
    starts = [k for k, s in enumerate(trajectory.segments) if k and s.restarts]
    if not starts:
        return [trajectory]
    bounds = [0, *starts, len(trajectory.segments)]
    return [
        Trajectory(trajectory.segments[a:b], dict(trajectory.meta))
        for a, b in itertools.pairwise(bounds)
    ]


def check_tags(text: str) -> None:
    """Raise `ValueError` unless every `<ins>`, `<des>`, `<refine>` in `text` is closed, unnested."""
    open_tag = None
    for match in _TAG.finditer(text):
        tag = match.group()
        if not tag.startswith("</"):
            if open_tag is not None:
                raise ValueError(
                    f"unbalanced tags: {tag} opened inside {open_tag} at column {match.start()}"
                )
            open_tag = tag
        elif open_tag is None or tag != open_tag.replace("<", "</", 1):
            raise ValueError(
                f"unbalanced tags: {tag} at column {match.start()} closes {open_tag or 'nothing'}"
            )
        else:
            open_tag = None
    if open_tag is not None:
        raise ValueError(f"unbalanced tags: {open_tag} is never closed")


def trajectory_to_record(traj: Trajectory, key: str, root: str | os.PathLike) -> dict[str, Any]:
    """One JSONL record for `traj`; its images are written as `root/images/<key>_<k>.png`.

    PNG keeps RGB pixels exactly, and JSON keeps floats exactly, so `record_to_trajectory` gives
    back an equal trajectory."""
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    segments = []
    for k, seg in enumerate(traj.segments):
        item: dict[str, Any] = {"type": "image" if seg.is_image else "text", "loss": seg.loss}
        if seg.is_image:
            name = f"images/{key}_{k}.png"
            seg.image.save(Path(root) / name, format="PNG")
            item.update(image=name, role=str(seg.role))
        else:
            item["text"] = seg.text
        if seg.logprobs is not None:
            item["logprobs"] = seg.logprobs
        if seg.meta:
            item["meta"] = seg.meta
        segments.append(item)
    return {"key": key, "version": FORMAT_VERSION, "meta": traj.meta, "segments": segments}


def record_to_trajectory(
    record: Any, root: str | os.PathLike, where: str, check: bool = True
) -> Trajectory:
    """Read a record written by `trajectory_to_record`; errors name `where` (file:line). With
    `check`, tags must balance within each run of text between images."""
    if not isinstance(record, dict) or not isinstance(record.get("segments"), list):
        raise TrajectoryError(f"{where}: expected an object with a 'segments' list")
    if record.get("version") != FORMAT_VERSION:
        raise TrajectoryError(
            f"{where}: format version {record.get('version')!r}, expected {FORMAT_VERSION}"
        )
    segments = []
    for k, item in enumerate(record["segments"]):
        at = f"{where}: segments[{k}]"
        kind = item.get("type") if isinstance(item, dict) else None
        try:
            if kind == "text":
                text = item["text"]
                if not isinstance(text, str):
                    raise ValueError(f"text must be a string, got {type(text).__name__}")
                segment = Segment(text=text)
            elif kind == "image":
                segment = Segment(image=_read_png(Path(root) / item["image"]), role=item["role"])
            else:
                raise ValueError(f"unknown segment type {kind!r}; expected 'text' or 'image'")
            segment.loss = bool(item.get("loss", True))
            segment.logprobs = item.get("logprobs")
            segment.meta = item.get("meta", {})
        except KeyError as err:
            raise TrajectoryError(f"{at}: missing key {err.args[0]!r}") from None
        except (ValueError, OSError) as err:
            raise TrajectoryError(f"{at}: {err}") from None
        segments.append(segment)
    if check:
        run: list[str] = []
        for k, segment in enumerate([*segments, None]):
            if segment is None or segment.is_image:
                try:
                    check_tags("".join(run))
                except ValueError as err:
                    raise TrajectoryError(f"{where}: text before segments[{k}]: {err}") from None
                run = []
            else:
                run.append(segment.text)
    return Trajectory(segments, record.get("meta", {}))


#: The largest side of an image avr reads (data, samples to score): its size is checked from the
#: header, before any pixel is decoded, so a small file of a huge image cannot exhaust memory.
MAX_IMAGE_SIDE = 4096


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path`, decoded (format kept, not converted) once its header shows both
    sides at most `MAX_IMAGE_SIDE`; any unreadable or oversized file is a `ValueError` naming it."""
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the size is checked right here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(Path(path).read_bytes()))
        with opened as image:
            width, height = image.size
            if max(width, height) > MAX_IMAGE_SIDE:
                raise ValueError(
                    f"{path}: a {width}×{height} image; at most {MAX_IMAGE_SIDE} px a side is read"
                )
            image.load()
            copy = image.copy()
            copy.format = image.format
            return copy
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def _read_png(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    return open_image(path).convert("RGB")


def image_to_array(image: Image.Image, resolution: int) -> np.ndarray:
    """An RGB image as `[H, W, 3]` float32 in [0, 1], checked against the expected resolution."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    if image.size != (resolution, resolution):
        raise ValueError(
            f"expected a {resolution}×{resolution} image, got {image.size[0]}×{image.size[1]}"
        )
    return np.asarray(image, dtype=np.float32) / 255.0
