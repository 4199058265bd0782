"""`CLIPScoreReward`: torchmetrics' `CLIPScore` between a rollout's final image and its prompt.

Weights are a local folder (`path:` in YAML) holding a transformers `CLIPModel` and `CLIPProcessor`
(`save_pretrained` output); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from avr.registry import register_reward
from avr.reward import FinalImageReward


class _Features(torch.nn.Module):
    """transformers 5 returns output objects from `get_*_features`; torchmetrics 1.9 expects the
    projected embeddings as tensors. This adapter hands it the tensors."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.clip.get_text_features(*args, **kwargs))


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_reward("clip_score")
class CLIPScoreReward(FinalImageReward):
    """CLIP score / 100 (cosine similarity of image and prompt embeddings, floored at 0)."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"path: {path} is not a folder with a saved CLIPModel and CLIPProcessor"
            )
        self.clip = CLIPScore(
            model_name_or_path=lambda: (
                _Features(CLIPModel.from_pretrained(path)),
                CLIPProcessor.from_pretrained(path),
            )
        )

    def score_image(self, image, spec) -> float:
        pixels = rearrange(torch.from_numpy(np.array(image)), "h w c -> 1 c h w")
        return float(self.clip(pixels, [spec.prompt])) / 100.0
