"""Latent codecs: where rectified flow runs. Pixels in [0, 1] ↔ latents, and latents ↔ tokens.

- `PixelCodec`: the latent is the image itself, scaled to [-1, 1] (ShapeWorld's tiny images).
- `VaeCodec`: a `diffusers.AutoencoderKL` (FLUX/SD-style), latents scaled by its scaling factor.

Both cut latents into `patch_size`² patches, one generation token each, its values ordered
`(c, p, q)` or, with `channels_last` (BAGEL's order), `(p, q, c)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn


class LatentCodec(nn.Module, ABC):
    """Encode pixels to latents, decode back, and cut latents into tokens."""

    def __init__(
        self,
        image_size: int,
        latent_size: int,
        channels: int,
        patch_size: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if latent_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide the latent side {latent_size}"
            )
        self.image_size, self.latent_size = image_size, latent_size
        self.channels, self.patch_size = channels, patch_size
        self.token_order = "(p q c)" if channels_last else "(c p q)"

    @property
    def grid(self) -> int:
        """Tokens per side of one image."""
        return self.latent_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Generation tokens per image."""
        return self.grid**2

    @property
    def token_dim(self) -> int:
        """Values per generation token."""
        return self.channels * self.patch_size**2

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [0, 1] → `[B, C, h, w]`."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` → `[B, 3, H, W]` in [0, 1]."""

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` → `[B, N, C·p·p]`, row-major patches."""
        p = self.patch_size
        return rearrange(latents, f"b c (h p) (w q) -> b (h w) {self.token_order}", p=p, q=p)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, N, C·p·p]` → `[B, C, h, w]`."""
        p, g = self.patch_size, self.grid
        pattern = f"b (h w) {self.token_order} -> b c (h p) (w q)"
        return rearrange(tokens, pattern, h=g, w=g, p=p, q=p)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise a clear error unless `pixels` is `[B, 3, image_size, image_size]`."""
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape [B, {', '.join(map(str, expected))}], got {list(pixels.shape)}"
            )


class PixelCodec(LatentCodec):
    """The identity codec: latents are pixels scaled to [-1, 1]."""

    def __init__(self, image_size: int, patch_size: int, channels_last: bool = False) -> None:
        super().__init__(image_size, image_size, 3, patch_size, channels_last)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        return pixels * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


class VaeCodec(LatentCodec):
    """A frozen `AutoencoderKL`; latents are its posterior mode, shifted and scaled as configured."""

    def __init__(
        self, vae: AutoencoderKL, image_size: int, patch_size: int, channels_last: bool = False
    ) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = vae.config.latent_channels
        super().__init__(image_size, image_size // factor, channels, patch_size, channels_last)
        self.vae = vae.requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        latents = self.vae.encode(pixels * 2 - 1).latent_dist.mode()
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode(latents / self.scale + self.shift).sample
        return ((pixels + 1) / 2).clamp(0, 1)
