"""`UnifiedLoss`: `λ_CE · CE(text) + MSE(velocity)`.

Normalization: CE is the mean over every CE target in the batch (text tokens the model writes,
`<img>`/`</img>` of generated images, `<eos>`); MSE is the mean over every value of every noisy
token. Both are token means over the whole packed batch, so a long trajectory weighs more than a
short one, as in LM pre-training; `per_sample` gives the sums behind them per trajectory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avr.backbone.model import UnifiedOutput


class UnifiedLoss(nn.Module):
    """Returns the loss and detached statistics (`loss/text`, `loss/image`, token counts)."""

    def __init__(self, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.ce_weight = ce_weight

    def forward(self, out: UnifiedOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and its parts."""
        zero = out.velocity.sum() * 0 + out.logits.sum() * 0  # keeps the graph when a part is empty
        text = F.cross_entropy(out.logits.float(), out.labels) if out.labels.numel() else zero
        image = (
            F.mse_loss(out.velocity.float(), out.target.float()) if out.velocity.numel() else zero
        )
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

    @staticmethod
    def per_sample(out: UnifiedOutput) -> dict[int, tuple[float, int, float, int]]:
        """Per trajectory: (CE sum, CE targets, squared-error sum, velocity values)."""
        ce = F.cross_entropy(out.logits.float(), out.labels, reduction="none")  # [T]
        se = ((out.velocity.float() - out.target.float()) ** 2).flatten(1).sum(-1)  # [M]
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
