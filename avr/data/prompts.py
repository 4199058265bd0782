"""`PromptDataModule`: an endless, seeded stream of ShapeWorld prompt batches for RL.

Batch `b` holds the specs drawn from the generator `(seed, b)`, its complexity levels mixed as
configured (each level drawn per prompt, or, `stratified`, in the same counts every batch). With
`cycle: n` the stream is a fixed training set of n batches visited in the same order on every pass
(batch b is batch b mod n), as Flow-GRPO trains on a fixed prompt set: a step's reward can then be
compared with the same prompts' reward one pass earlier. `state_dict()` is the number of batches the
trainer received, so a resumed run draws exactly the prompts it would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from avr.data.build import LEVEL_TAGS, parse_mix
from avr.data.datamodule import StreamPosition
from avr.world import PromptSpec, sample_spec
from avr.world.split import check_split, draw_in_split


class PromptStream(IterableDataset):
    """Batches of `batch_size` specs from batch number `start` on."""

    def __init__(
        self,
        batch_size: int,
        mix: dict[str, float],
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        stratified: bool = False,
        cycle: int = 0,
    ) -> None:
        self.batch_size, self.mix, self.seed, self.start = batch_size, mix, seed, start
        self.rank, self.world_size, self.split = rank, world_size, split
        self.stratified, self.cycle = stratified, cycle

    def batch(self, number: int) -> list[PromptSpec]:
        """The specs of batch `number` (of `number mod cycle` when the stream cycles)."""
        if self.cycle:
            number %= self.cycle
        rng = np.random.default_rng([self.seed, number])
        levels = list(self.mix)
        if self.stratified:
            chosen = rng.permutation(stratified_levels(self.mix, self.batch_size))
        else:
            chosen = rng.choice(levels, size=self.batch_size, p=[self.mix[lv] for lv in levels])
        tags = [str(rng.choice(LEVEL_TAGS[level])) for level in chosen]
        return [draw_in_split(partial(sample_spec, tag), self.split, rng) for tag in tags]

    def __iter__(self) -> Iterator[list[PromptSpec]]:
        local = self.start  # local batch k is global batch k·world_size + rank
        while True:
            yield self.batch(local * self.world_size + self.rank)
            local += 1


def stratified_levels(mix: dict[str, float], size: int) -> list[str]:
    """`size` levels in the proportions of `mix`, rounded by largest remainder (ties: mix order)."""
    total = sum(mix.values())
    exact = {level: size * share / total for level, share in mix.items()}
    counts = {level: int(np.floor(x)) for level, x in exact.items()}
    order = sorted(mix, key=lambda level: -(exact[level] - counts[level]))
    for level in order[: size - sum(counts.values())]:
        counts[level] += 1
    return [level for level in mix for _ in range(counts[level])]


def _as_is(batch):
    return batch


class PromptDataModule(StreamPosition):
    """Prompts for RL: `batch_size` prompts per step (each rolled out `group_size` times by the
    module)."""

    def __init__(
        self,
        batch_size: int = 4,
        mix: str = "simple=0.3,medium=0.4,complex=0.3",
        seed: int = 0,
        split: str = "train",
        stratified: bool = False,
        cycle: int = 0,
    ) -> None:
        """`mix`: share of each complexity level, as for `python -m avr.data build`; `split`:
        which prompts (`train`: none with a combination reserved for evaluation); `stratified`:
        every batch holds the levels in the counts `mix` gives its size (largest remainder), so
        the batch's mean reward does not swing with how many hard prompts it drew; `cycle`: the
        stream repeats every `cycle` batches (a training set of `cycle × batch_size` prompts,
        visited in the same order each pass; 0: every batch is new)."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: expected ≥ 1 prompts, got {batch_size}")
        if cycle < 0:
            raise ValueError(f"data.cycle: expected a number of batches >= 0, got {cycle}")
        self.stratified, self.cycle = stratified, cycle
        self.batch_size, self.mix, self.seed = batch_size, parse_mix(mix), seed
        check_split(split)  # an unknown split fails at config time
        self.split = split
        self.batches_seen = 0

    def train_dataloader(self) -> DataLoader:
        rank, world = self.shard()
        stream = PromptStream(
            self.batch_size,
            self.mix,
            self.seed,
            self.batches_seen,
            rank,
            world,
            self.split,
            self.stratified,
            self.cycle,
        )
        return DataLoader(stream, batch_size=None, collate_fn=_as_is)

    def transfer_batch_to_device(self, batch: Any, device, dataloader_idx: int) -> Any:
        """A batch is a list of prompt specs: nothing to move."""
        return batch
