"""Rotary positions of image tokens (`UnifiedConfig.image_rope`).

`sequence` (BAGEL's layout): every token of an image copy sits at the image's one sequence
position, so RoPE says nothing about where in the image a token is (the absolute 2-D position
embedding does). `grid`: the rotary frequencies are split three ways, interleaved (frequency i
rotates by axis i mod 3): the sequence position, and the token's row and column in the latent
grid. Text tokens use their sequence position on all three axes, which is exactly 1-D RoPE, so a
text-only sequence runs as before; two images' tokens at the same cell differ on the sequence axis
alone, which makes "attend to the same place in the image before" a pattern that needs no content.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def image_grid(length: int, gen_tokens: int) -> torch.Tensor:
    """(row, col) `[length, 2]` of the tokens of an image copy of `length` tokens (row-major, a
    square grid), in units of the generation grid of `gen_tokens` (a coarser reader grid is
    scaled onto it, so its cells line up with the latent cells they cover)."""
    side, gen_side = math.isqrt(length), math.isqrt(gen_tokens)
    if side * side != length or gen_side * gen_side != gen_tokens:
        raise ValueError(f"an image copy of {length} tokens is not a square grid")
    idx = torch.arange(length)
    return torch.stack([idx // side * gen_side // side, idx % side * gen_side // side], -1)


def rope_positions(kind: str, position: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """The RoPE positions the layers take for `image_rope` `kind`: `position` `[B, L]` itself
    (`sequence`), or `[3, B, L]` (sequence, row, column) for `grid`, where tokens with no grid
    cell (`grid` `[B, L, 2]` −1, or None: text) use their sequence position on every axis."""
    if kind == "sequence":
        return position
    if grid is None:
        return position.expand(3, *position.shape)
    grid = grid.to(position.device)
    row = torch.where(grid[..., 0] >= 0, grid[..., 0], position)
    col = torch.where(grid[..., 1] >= 0, grid[..., 1], position)
    return torch.stack([position, row, col])


def rotary(embedding: nn.Module, x: torch.Tensor, position: torch.Tensor):
    """cos, sin `[B, L, head_dim]` from a transformers rotary `embedding` for 1-D positions
    `[B, L]`, or for `[3, B, L]`: frequency i (both halves of the rotate-half layout) taken from
    axis i mod 3."""
    if position.ndim == 2:
        return embedding(x, position)
    parts = [embedding(x, axis) for axis in position]
    half = parts[0][0].shape[-1] // 2
    axis = (torch.arange(half, device=x.device) % 3).repeat(2)
    cos = torch.stack([c for c, _ in parts])  # [3, B, L, head_dim]
    sin = torch.stack([s for _, s in parts])
    pick = axis[None, None, None].expand_as(cos[:1])
    return cos.gather(0, pick)[0], sin.gather(0, pick)[0]
