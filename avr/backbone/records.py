"""What the unified model's forward returns (`UnifiedOutput`, read by the loss) and keeps between
generation steps (`KVCache`, grown by a `Session`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Keys/values of everything before the current step, per layer `[B, H_kv, L, D_head]`, with
    which cached positions may be attended (`valid`, `[B, L]`) and the next RoPE position `[B]`."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    valid: torch.Tensor | None = None
    next_position: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Cached positions."""
        return 0 if self.valid is None else self.valid.shape[1]


@dataclass
class UnifiedOutput:
    """Training outputs: logits and labels of the CE targets, predicted and target velocities of
    the generated images, and the trajectory each belongs to (for per-sample losses)."""

    logits: torch.Tensor  # [T, V]
    labels: torch.Tensor  # [T]
    label_sample: torch.Tensor  # [T]
    velocity: torch.Tensor  # [M, N, D_tok]
    target: torch.Tensor  # [M, N, D_tok]
    image_sample: torch.Tensor  # [M]
    image_t: torch.Tensor | None = None  # [M] timestep of each noisy copy
