"""`PromptDataModule`: an endless, seeded stream of ShapeWorld prompt batches for RL.

Batch `b` holds the specs drawn from the generator `(seed, b)`, its complexity levels mixed as
configured; `state_dict()` is the number of batches the trainer received, so a resumed run draws
exactly the prompts it would have.
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
    ) -> None:
        self.batch_size, self.mix, self.seed, self.start = batch_size, mix, seed, start
        self.rank, self.world_size, self.split = rank, world_size, split

    def batch(self, number: int) -> list[PromptSpec]:
        """The specs of batch `number`."""
        rng = np.random.default_rng([self.seed, number])
        levels = list(self.mix)
        chosen = rng.choice(levels, size=self.batch_size, p=[self.mix[lv] for lv in levels])
        tags = [str(rng.choice(LEVEL_TAGS[level])) for level in chosen]
        return [draw_in_split(partial(sample_spec, tag), self.split, rng) for tag in tags]

    def __iter__(self) -> Iterator[list[PromptSpec]]:
        local = self.start  # local batch k is global batch k·world_size + rank
        while True:
            yield self.batch(local * self.world_size + self.rank)
            local += 1


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
    ) -> None:
        """`mix`: share of each complexity level, as for `python -m avr.data build`; `split`:
        which prompts (`train`: none with a combination reserved for evaluation)."""
        super().__init__()
        self.batch_size, self.mix, self.seed = batch_size, parse_mix(mix), seed
        check_split(split)  # an unknown split fails at config time
        self.split = split
        self.batches_seen = 0

    def train_dataloader(self) -> DataLoader:
        rank, world = self.shard()
        stream = PromptStream(
            self.batch_size, self.mix, self.seed, self.batches_seen, rank, world, self.split
        )
        return DataLoader(stream, batch_size=None, collate_fn=_as_is)

    def transfer_batch_to_device(self, batch: Any, device, dataloader_idx: int) -> Any:
        """A batch is a list of prompt specs: nothing to move."""
        return batch
