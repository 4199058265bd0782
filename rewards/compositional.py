"""`CompositionalReward`: the ShapeWorld verifier as a `torchmetrics.Metric`.

The same object scores an evaluation (`update` over batches, `compute` gives the mean) and returns
per-sample rewards for RL (`score`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torchmetrics import Metric

from avr.registry import register_reward
from avr.world.spec import PromptSpec
from avr.world.verify import Verifier


@register_reward("compositional")
class CompositionalReward(Metric):
    """Reward = the verifier's partial score (fraction of clauses satisfied), or its strict
    correctness (1.0 / 0.0) when `strict=True`.

    Images are `[B, 3, H, W]` tensors in [0, 1] or PIL RGB images; `specs` are the prompts' specs.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, strict: bool = False, verifier: Verifier | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strict = strict
        self.verifier = verifier or Verifier()
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(
        self, images: torch.Tensor | Sequence[Image.Image], specs: Sequence[PromptSpec]
    ) -> torch.Tensor:
        """Per-sample rewards `[B]` (float32), without touching the metric's state."""
        arrays = _to_arrays(images)
        if len(arrays) != len(specs):
            raise ValueError(f"got {len(arrays)} images for {len(specs)} specs")
        rewards = []
        for array, spec in zip(arrays, specs, strict=True):
            verdict = self.verifier.verify(array, spec)
            rewards.append(float(verdict.correct) if self.strict else verdict.score)
        return torch.tensor(rewards, dtype=torch.float32)

    def update(self, images: torch.Tensor | Sequence[Image.Image], specs: Sequence[PromptSpec]):
        """Accumulate the rewards of a batch."""
        rewards = self.score(images, specs)
        self.total += rewards.sum().to(self.total)
        self.count += rewards.numel()

    def compute(self) -> torch.Tensor:
        """Mean reward over everything seen since the last reset."""
        return (self.total / self.count.clamp(min=1)).float()


def _to_arrays(images: torch.Tensor | Sequence[Image.Image]) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        pixels = rearrange(images.detach().float().clamp(0, 1).cpu(), "b c h w -> b h w c")
        return list(pixels.numpy())
    return [np.asarray(image.convert("RGB")) for image in images]
