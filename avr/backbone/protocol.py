"""`Backbone`: what trainers, CLIs and the rollout engine need from a model, and nothing more.

`UnifiedModel` (continuous image latents, BAGEL's layout) and `JanusBackbone` (discrete image
tokens) both implement it; so does a user's backbone. Backbones are provided through the
entry-point group `avr.backbones` (`kind = package.module:Class`), the built-ins as any user's
package, so a checkpoint naming a kind rebuilds it and `from_pretrained` reads the folders a class
says it reads (`reads_folder`), with no edit of avr; `register_backbone` registers a class in code.
Nothing outside `avr.backbone` tells backbones apart by name: it calls these methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ReplayPlan:
    """How RL replays a batch of rollouts: which denoising steps of each generated image to train,
    and the row length. The sampler's settings (temperature, noise level, guidance) are not here:
    the replay reads them from the rollouts' own samples (`generation.sampler_settings`)."""

    max_len: int = 2048
    """Longest packed row of a replay."""
    sde_steps: Callable[[int], Sequence[int]] | None = None
    """Given an image's number of denoising steps, the steps to train (None: every one)."""
    anchor_steps: Callable[[int, Sequence[int]], Sequence[int]] | None = None
    """Given an image's number of denoising steps and the steps trained, the untrained steps to
    replay for the anchor (`PolicyTerms.anchor`; None: none)."""


@dataclass
class PolicyTerms:
    """One kind of sampled action of a batch of rollouts (text tokens, image tokens, SDE steps),
    replayed by the policy: what the PPO-clip loss needs, one entry per action."""

    logp: torch.Tensor
    """`[A]` the policy's log-probs of the sampled actions (differentiable)."""
    kl: torch.Tensor
    """`[A]` per-action estimate of the KL to the reference."""
    sample: torch.Tensor
    """`[A]` long: the index of the rollout each action belongs to."""
    recorded: torch.Tensor | None
    """`[A]` the log-probs the sampler recorded (None: not recorded for every action)."""
    unit: str = "tokens"
    """What an action is, for logging (`train/<kind>/<unit>` counts them)."""
    anchor: torch.Tensor | None = None
    """`[K]` per replayed untrained denoising step (`ReplayPlan.anchor_steps`): the mean squared
    difference between the policy's and the reference's velocity (None: none replayed)."""


@runtime_checkable
class BackboneSession(Protocol):
    """What the policy and the rollout engine call on a backbone's `session()`: incremental
    generation over a growing interleaved context of `batch_size` sequences. The unified model's
    `Session` and Janus' `JanusSession` implement it, both on `avr.backbone.generation.TextSession`
    (text appending and sampling, and `merge`/`split` of a single row); a backbone whose sessions
    batch rows (`session_rows` not 1) overrides `merge` and `split` as `Session` does."""

    batch_size: int
    last_logits: torch.Tensor | None
    """`[B, V]` logits at each row's last token (None before anything is appended)."""

    def append_text(self, texts: list[str]) -> None:
        """Append one text per row."""

    def append_tokens(self, ids: list[list[int]]) -> None:
        """Append token ids per row (an empty list appends nothing to that row)."""

    def append_image(self, pixels: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Read images `[B, 3, H, W]`, `<img>` … `</img>`."""

    def sample_text(
        self,
        max_new_tokens: int,
        stop=None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator=None,
        active=None,
    ) -> Any:
        """Decode until a stop token or `max_new_tokens`: a `TextSample` (ids, log-probs, text)."""

    def generate_image(
        self, steps: int = 25, cfg_scale: float = 1.0, noise_level: float = 0.0, **kwargs: Any
    ) -> Any:
        """Draw one image per row after the context: an `ImageSample`."""


@runtime_checkable
class Backbone(Protocol):
    """A unified model as avr uses it (an `nn.Module`)."""

    kind: ClassVar[str]
    """Name recorded in checkpoints; `backbone_class(kind)` finds the class again."""
    session_rows: ClassVar[int | None]
    """Most sequences one `session` holds (None: any number); the rollout engine batches up to it."""
    tokenizer: PreTrainedTokenizerBase

    def session(self, batch_size: int = 1) -> BackboneSession:
        """KV-cached incremental generation over `batch_size` sequences (`BackboneSession`)."""

    def packer(self, max_len: int) -> Any:
        """How SFT batches are built from trajectories: a picklable collate function (e.g.
        `Packer`), or None to receive the list of trajectories itself."""

    def sft_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher-forced loss of one batch (as `packer` built it) and its parts: `loss/text`,
        `loss/image` and `tokens` (tokens processed, for throughput)."""

    def policy_terms(
        self,
        trajectories: Sequence[Any],
        reference: Callable[[Callable[[Backbone], Any]], Any],
        plan: ReplayPlan,
    ) -> dict[str, PolicyTerms]:
        """Replay rollouts of this backbone for RL: `{"text": …, "image": …}`, each action's
        log-prob under this model and its KL to the reference. `reference(fn)` returns `fn`
        applied to the reference model (no gradient)."""

    def checkpoint_config(self) -> dict[str, Any]:
        """Everything but the weights and tokenizer needed to rebuild this model (JSON-able)."""

    @classmethod
    def from_checkpoint_config(
        cls, config: dict[str, Any], tokenizer: PreTrainedTokenizerBase
    ) -> Backbone:
        """A randomly initialised model from `checkpoint_config()` (weights are loaded after)."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write an exported model folder (weights, config, tokenizer) atomically."""


#: The entry-point group through which a package provides a backbone class.
GROUP = "avr.backbones"
#: What a backbone class must have (besides instances' `tokenizer`).
REQUIRED = (
    "kind",
    "session",
    "packer",
    "sft_loss",
    "policy_terms",
    "checkpoint_config",
    "from_checkpoint_config",
    "save_pretrained",
)
_BACKBONES: dict[str, type] = {}
_loaded: set[str] = set()


def register_backbone(cls: type) -> type:
    """Class decorator: checkpoints recording `cls.kind` rebuild with `cls`."""
    existing = _BACKBONES.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"backbone kind {cls.kind!r} is already registered by {existing}")
    _BACKBONES[cls.kind] = cls
    return cls


def load_backbones() -> None:
    """Import every entry point of the `avr.backbones` group once and register the class it
    names; one that does not load, or names anything but a backbone class, is a `ValueError`
    naming the entry point and its distribution (a backbone is never silently absent)."""
    for ep in entry_points(group=GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _loaded:
            continue
        dist = ep.dist.name if ep.dist is not None else "unknown"
        where = f"entry point {ep.name!r} = {ep.value!r} in group {GROUP} (distribution {dist})"
        try:
            target = ep.load()
        except Exception as err:
            raise ValueError(f"{where} does not load: {type(err).__name__}: {err}") from err
        if not isinstance(target, type):
            raise ValueError(f"{where} names {type(target).__name__} {ep.value}; expected a class")
        missing = [name for name in REQUIRED if not hasattr(target, name)]
        if missing:
            raise ValueError(
                f"{where} names {target.__qualname__}, which lacks {', '.join(missing)}"
            )
        if target.kind != ep.name:
            raise ValueError(f"{where}: the class's kind is {target.kind!r}, not {ep.name!r}")
        register_backbone(target)
        _loaded.add(key)


def backbones() -> dict[str, type]:
    """Every registered backbone class by kind (entry points loaded first)."""
    load_backbones()
    return dict(sorted(_BACKBONES.items()))


def backbone_class(kind: str) -> type:
    """The class registered for `kind`; unknown kinds list the known ones."""
    known = backbones()
    if kind not in known:
        raise ValueError(
            f"unknown backbone kind {kind!r}; registered: {', '.join(known) or 'none'}"
        )
    return known[kind]


def folder_reader(directory: str | os.PathLike) -> type | None:
    """The registered backbone class whose `reads_folder(directory)` says it reads that folder
    (Janus' transformers folders, a user's own layout), or None."""
    for cls in backbones().values():
        reads = getattr(cls, "reads_folder", None)
        if reads is not None and reads(Path(directory)):
            return cls
    return None
