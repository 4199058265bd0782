"""`UnifiedLoss`: `λ_CE · CE(text) + MSE(image)`.

The image term is the velocity MSE (`image_loss="velocity"`, SD3/BAGEL), or the same error
measured on the clean image (`"x0"`: `‖x̂₀ − x₀‖² = t²·‖v̂ − v‖²`, with `t` floored at the model's
`x0_min_t`), which does not weight low-noise timesteps by `1/t²` against the high-noise ones where
the prompt decides the layout.

Normalization: CE is the mean over every CE target in the batch (text tokens the model writes,
`<img>`/`</img>` of generated images, `<eos>`); MSE is the mean over every value of every noisy
token. Both are token means over the whole packed batch, so a long trajectory weighs more than a
short one, as in LM pre-training; `per_sample` gives the sums behind them per trajectory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avr.backbone.records import UnifiedOutput


class UnifiedLoss(nn.Module):
    """Returns the loss and detached statistics (`loss/text`, `loss/image`, token counts)."""

    def __init__(
        self, ce_weight: float = 1.0, image_loss: str = "velocity", min_t: float = 0.05
    ) -> None:
        super().__init__()
        if image_loss not in ("velocity", "x0"):
            raise ValueError(f"image_loss: expected 'velocity' or 'x0', got {image_loss!r}")
        self.ce_weight, self.image_loss, self.min_t = ce_weight, image_loss, min_t

    @classmethod
    def for_model(cls, config) -> UnifiedLoss:
        """The loss a `UnifiedConfig` asks for (`ce_weight`, `image_loss`, `x0_min_t`)."""
        return cls(config.ce_weight, config.image_loss, config.x0_min_t)

    def image_error(self, out: UnifiedOutput) -> torch.Tensor:
        """Per-value image error `[M, N, D_tok]` in the configured space."""
        error = out.velocity.float() - out.target.float()
        if self.image_loss == "x0":
            error = error * out.image_t.float().clamp(min=self.min_t).reshape(-1, 1, 1)
        return error

    def forward(self, out: UnifiedOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and its parts."""
        zero = out.velocity.sum() * 0 + out.logits.sum() * 0  # keeps the graph when a part is empty
        text = F.cross_entropy(out.logits.float(), out.labels) if out.labels.numel() else zero
        image = self.image_error(out).pow(2).mean() if out.velocity.numel() else zero
        loss = self.ce_weight * text + image
        stats = {
            "loss/text": text.detach(),
            "loss/image": image.detach(),
            "tokens/text": torch.tensor(out.labels.numel()),
            "tokens/image": torch.tensor(
                out.velocity.shape[0] * out.velocity.shape[1] if out.velocity.ndim == 3 else 0
            ),
        }
        return loss, stats

    def per_sample(self, out: UnifiedOutput) -> dict[int, tuple[float, int, float, int]]:
        """Per trajectory: (CE sum, CE targets, squared-error sum, image values)."""
        ce = F.cross_entropy(out.logits.float(), out.labels, reduction="none")  # [T]
        se = self.image_error(out).pow(2).flatten(1).sum(-1)  # [M]
        samples = set(out.label_sample.tolist()) | set(out.image_sample.tolist())
        per_image = out.velocity[0].numel() if out.velocity.shape[0] else 0
        result = {}
        for s in sorted(samples):
            text, images = out.label_sample == s, out.image_sample == s
            result[s] = (
                float(ce[text].sum()),
                int(text.sum()),
                float(se[images].sum()),
                int(images.sum()) * per_image,
            )
        return result
