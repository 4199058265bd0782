"""Attention over packed rows one trajectory at a time.

A packed row holds several trajectories that never attend to each other (`packing.allowed`), so
the dense mask of a row of L tokens pays for L² query–key pairs of which only Σ lᵢ² can be
allowed. `TrajectoryAttention` gathers each trajectory's queries, keys and values out of the
rows, groups trajectories of similar length (padded to the group's longest), runs SDPA on each
group with the trajectory's own mask, and scatters the outputs back: the same attention as the
dense mask (the same allowed pairs; only the summation order differs), at a cost that grows with
the trajectories' lengths instead of the rows'. It is what flash-attn's varlen kernels do on GPUs,
in plain PyTorch, for CPUs (where FlexAttention has no backward).

Padding tokens of a row belong to no trajectory: their attention output is zero (the dense mask
lets each attend to itself). Nothing reads them: they carry no label and no image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from avr.backbone.packing import PackedBatch, allowed


@dataclass
class _Group:
    index: torch.Tensor  # [G, Lg]: flat token index (row * L + column) of each slot
    valid: torch.Tensor  # [G, Lg]: whether the slot holds a token (False: padding of the group)
    mask: torch.Tensor  # [G, 1, Lg, Lg]: may attend


@dataclass
class TrajectoryAttention:
    """The attention of one packed batch, trajectory by trajectory (see the module docstring).
    Built once per forward (`of`) and called by every layer in place of SDPA with a dense mask."""

    groups: list[_Group]
    rows: int
    length: int
    scatter: torch.Tensor  # flat token index of every valid slot, groups in order

    @classmethod
    def of(cls, batch: PackedBatch, spread: float = 0.8) -> TrajectoryAttention:
        """The groups of `batch`'s trajectories: sorted by length, a group takes trajectories
        down to `spread` times its longest (so a group pads at most 1/spread² of its area)."""
        if not 0 < spread <= 1:
            raise ValueError(f"spread: expected a number in (0, 1], got {spread}")
        sample = batch.sample.cpu().numpy()
        rows, length = sample.shape
        spans = []  # (length, flat start)
        for r in range(rows):
            row = sample[r]
            starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
            ends = np.r_[starts[1:], length]
            spans += [
                (e - s, r * length + s) for s, e in zip(starts, ends, strict=True) if row[s] >= 0
            ]
        spans.sort(key=lambda span: -span[0])
        device = batch.sample.device
        flat = {
            "sample": batch.sample.reshape(-1),
            "block": batch.block.reshape(-1),
            "kind": batch.token_type.reshape(-1),
            "uncond": batch.uncond.reshape(-1),
        }
        groups, i = [], 0
        while i < len(spans):
            longest = spans[i][0]
            j = i
            while j < len(spans) and spans[j][0] >= spread * longest:
                j += 1
            groups.append(_group(spans[i:j], longest, flat, device))
            i = j
        scatter = (
            torch.cat([g.index[g.valid] for g in groups])
            if groups
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        return cls(groups=groups, rows=rows, length=length, scatter=scatter)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool = False
    ) -> torch.Tensor:
        """Attention of `q` `[R, H, L, d]` over `k`, `v` `[R, H_kv, L, d]` → `[R, H, L, d]`."""
        flat_q, flat_k, flat_v = (_tokens_first(x) for x in (q, k, v))
        outputs = []
        for group in self.groups:
            out = F.scaled_dot_product_attention(
                _gathered(flat_q, group.index),
                _gathered(flat_k, group.index),
                _gathered(flat_v, group.index),
                attn_mask=group.mask,
                enable_gqa=enable_gqa,
            )  # [G, H, Lg, d]
            outputs.append(out.transpose(1, 2)[group.valid])  # [valid, H, d]
        heads, dim = q.shape[1], q.shape[3]
        out = flat_q.new_zeros(self.rows * self.length, heads, dim)
        if outputs:
            out = out.index_copy(0, self.scatter, torch.cat(outputs))
        return out.reshape(self.rows, self.length, heads, dim).transpose(1, 2)


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """`[R, H, L, d]` → `[R·L, H, d]`."""
    rows, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(rows * length, heads, dim)


def _gathered(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The slots `index` `[G, Lg]` of `flat` `[R·L, H, d]` → `[G, H, Lg, d]`."""
    return flat[index].transpose(1, 2)


def _group(spans, longest: int, flat: dict, device) -> _Group:
    offsets = torch.arange(longest)
    lengths = torch.tensor([n for n, _ in spans])
    starts = torch.tensor([s for _, s in spans])
    valid = offsets[None] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + offsets[None], starts[:, None]).to(device)
    valid = valid.to(device)
    sample, block = flat["sample"][index], flat["block"][index]
    mask = allowed(
        sample[:, :, None],
        sample[:, None, :],
        index[:, :, None],  # flat positions order the tokens of one row as columns do
        index[:, None, :],
        block[:, :, None],
        block[:, None, :],
        flat["kind"][index][:, None, :],
        flat["uncond"][index][:, :, None],
    )
    mask = mask & valid[:, None, :]
    first = torch.arange(longest, device=device) == 0
    mask = mask | (~valid[:, :, None] & first[None, None, :])  # a padding slot attends slot 0
    return _Group(index=index, valid=valid, mask=mask[:, None])
