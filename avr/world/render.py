"""Draw ShapeWorld scenes: anti-aliased by supersampling, deterministic, any resolution.

Shapes are axis-aligned: a disc, a square and an upright isosceles triangle, each filling the object's
bounding box (`size` × `size`). Each pixel takes the fraction of its `SUPERSAMPLE`² sample points
that a shape covers, so edge pixels mix the object color with what lies beneath, as real
anti-aliasing does.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange
from PIL import Image, ImageFilter

from avr.world.scene import BACKGROUND, PALETTE, SHAPES, Scene

SUPERSAMPLE = 4


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """Render `scene` to a `resolution`² RGB image (same scene, same pixels)."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}")
    canvas = np.empty((resolution, resolution, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        box = tuple(v * resolution for v in obj.box)
        x0, y0 = (max(0, int(np.floor(v))) for v in box[:2])
        x1, y1 = (min(resolution, int(np.ceil(v))) for v in box[2:])
        if x1 <= x0 or y1 <= y0:
            continue
        cover = coverage(obj.shape, box, (x0, y0, x1, y1))[..., None]  # [h, w, 1]
        patch = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = patch * (1 - cover) + np.float32(PALETTE[obj.color]) * cover
    return Image.fromarray(canvas.round().astype(np.uint8), "RGB")


def coverage(shape: str, box, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel of `window = (x0, y0, x1, y1)` covered by `shape` drawn in `box`
    (pixels, floats), from `SUPERSAMPLE`² sample points per pixel. Shared by the renderer and the
    verifier's shape fit, so both agree on what each shape is.

    Shapes fill their box: a square, a disc, an upright isosceles triangle (apex at the top centre).
    """
    bx0, by0, bx1, by1 = box
    wx0, wy0, wx1, wy1 = window
    offsets = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs = (np.arange(wx0, wx1, dtype=np.float32)[:, None] + offsets).reshape(-1)  # [w·S]
    ys = (np.arange(wy0, wy1, dtype=np.float32)[:, None] + offsets).reshape(-1)  # [h·S]
    u = (xs[None, :] - bx0) / (bx1 - bx0)  # [1, w·S], 0..1 across the box
    v = (ys[:, None] - by0) / (by1 - by0)  # [h·S, 1]
    if shape == "square":
        inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    elif shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside = (v >= 0) & (v < 1) & (np.abs(u - 0.5) <= v / 2)
    else:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    return rearrange(
        inside.astype(np.float32), "(h sy) (w sx) -> h w (sy sx)", sy=SUPERSAMPLE, sx=SUPERSAMPLE
    ).mean(-1)


def degrade(
    image: Image.Image, *, noise: float = 0.05, blur: float = 0.5, seed: int = 0
) -> Image.Image:
    """Blur (Gaussian, `blur` px) then add Gaussian noise of std `noise` × 255, clipped: the
    corruptions the verifier is tested against. Deterministic given `seed`."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    rng = np.random.default_rng(seed)
    pixels = pixels + rng.normal(0.0, noise * 255.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
