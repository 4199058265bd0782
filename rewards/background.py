"""`CleanBackgroundReward`: how much of a final image's canvas is still the white background."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from avr.registry import register_reward
from avr.reward import FinalImageReward
from avr.world.verify import Verifier


@register_reward("clean_background")
class CleanBackgroundReward(FinalImageReward):
    """The share of background pixels (those the verifier assigns to no object, less the two-pixel
    rim around objects where anti-aliasing blends them into the canvas) within `tolerance` of white
    in every channel. ShapeWorld renders score 1; a canvas covered in faint speckles,
    which the compositional reward cannot see, scores near 0. An image without background pixels
    scores 0.

    Flow-GRPO on the compositional reward alone speckled the tiny model's canvas with pale single
    pixels; this reward measures it (logged at weight 0 by `experiments/overlays/rl-direct.yaml`).
    As a training term it did not stop the drift (weight 0.3: 0.98 → 0.37 in 40 steps), since the
    speckles come from denoising steps the Flow-GRPO window does not train: `RLModule.ode_anchor`
    does."""

    def __init__(self, tolerance: int = 5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= tolerance < 255:
            raise ValueError(f"tolerance must be in [0, 255) (pixel values), got {tolerance}")
        self.tolerance = tolerance
        self.verifier = Verifier()

    def score_image(self, image, spec) -> float:
        objects = ndimage.binary_dilation(~self.verifier.background(image), iterations=2)
        background = ~objects
        if not background.any():
            return 0.0
        white = (np.asarray(image) >= 255 - self.tolerance).all(-1)
        return float(white[background].mean())
