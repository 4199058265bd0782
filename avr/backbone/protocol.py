"""`Backbone`: what trainers, CLIs and the rollout engine need from a model, and nothing more.

`UnifiedModel` (continuous image latents, BAGEL's layout) and `JanusBackbone` (discrete image
tokens) both implement it; so does a user's backbone, registered by its `kind` with
`register_backbone` so that checkpoints naming it rebuild it. Nothing outside `avr.backbone`
tells backbones apart by name: it calls these methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ReplayPlan:
    """How RL replays a batch of rollouts: the sampler's settings (the replay must compute the
    distributions it sampled from) and which denoising steps of each generated image to train."""

    temperature: float = 1.0
    """Text sampling temperature (log-probs are taken at it)."""
    noise_level: float = 0.7
    """The SDE's noise level (a continuous backbone's step log-probs)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance of the sampled velocity (its unconditional branch is detached)."""
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
class Backbone(Protocol):
    """A unified model as avr uses it (an `nn.Module`)."""

    kind: ClassVar[str]
    """Name recorded in checkpoints; `backbone_class(kind)` finds the class again."""
    session_rows: ClassVar[int | None]
    """Most sequences one `session` holds (None: any number); the rollout engine batches up to it."""
    tokenizer: PreTrainedTokenizerBase

    def session(self, batch_size: int = 1) -> Any:
        """A `Session` (KV-cached incremental generation) over `batch_size` sequences."""

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


_BACKBONES: dict[str, type] = {}


def register_backbone(cls: type) -> type:
    """Class decorator: checkpoints recording `cls.kind` rebuild with `cls`."""
    existing = _BACKBONES.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"backbone kind {cls.kind!r} is already registered by {existing}")
    _BACKBONES[cls.kind] = cls
    return cls


def backbone_class(kind: str) -> type:
    """The class registered for `kind`; unknown kinds list the known ones."""
    if kind not in _BACKBONES:
        known = ", ".join(sorted(_BACKBONES)) or "none"
        raise ValueError(f"unknown backbone kind {kind!r}; registered: {known}")
    return _BACKBONES[kind]
