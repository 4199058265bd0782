"""`TrajectoryDataModule`: streams a built data set (sharded JSONL + PNG) into training batches.

- Deterministic: epoch `e` visits records in the permutation drawn from `(seed, e)`; batch `b`
  holds the same records whatever the number of workers (worker `w` builds batches `w, w + W, …`,
  and the loader takes them round-robin).
- Resumable: `state_dict()` counts the batches the trainer has received; a restored module starts
  at the next one (Lightning saves and restores this with the checkpoint).
- Distributed: rank `r` of `W` takes global batches `r, r + W, …`.
- Packing happens in the workers, through the backbone's `Packer`, with per-record noise seeds
  `(seed, epoch, record)` so a record is noised the same however it is batched.
- Bad records (invalid JSON or UTF-8, a missing or unreadable image, an image of another size than
  the manifest's `resolution`, a shard shorter than its manifest) raise `TrajectoryError` naming
  file:line; with `skip_invalid`, each is logged with the running count and skipped, and a run of
  as many invalid records in a row as the data set holds stops with an error instead of looping.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avr.sequence import FORMAT_VERSION, Trajectory, TrajectoryError, record_to_trajectory

log = logging.getLogger("avr.data")


class TrajectoryStream(IterableDataset):
    """Endless stream of batches (lists of trajectories, or packed batches with a `packer`)."""

    def __init__(
        self,
        root: str | Path,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        skip_invalid: bool = False,
        packer: Callable[[list[Trajectory], list[int]], Any] | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.root, self.batch_size, self.seed, self.shuffle = Path(root), batch_size, seed, shuffle
        self.skip_invalid, self.packer, self.start = skip_invalid, packer, start
        self.rank, self.world_size = rank, world_size
        self.manifest = read_manifest(self.root)
        self.index = [
            (s["file"], line) for s in self.manifest["shards"] for line in range(s["records"])
        ]
        if len(self.index) < batch_size:
            raise ValueError(
                f"{self.root}: {len(self.index)} records, fewer than one batch of {batch_size}"
            )
        self.per_epoch = (
            len(self.index) // batch_size
        )  # the remainder waits for the next epoch's order

    def batch_records(self, batch: int) -> tuple[int, list[int]]:
        """Epoch and record indices of global batch number `batch`."""
        epoch, within = divmod(batch, self.per_epoch)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            if self.shuffle
            else np.arange(len(self.index))
        )
        return epoch, order[within * self.batch_size : (within + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lines: dict[str, list[bytes]] = {}
        skipped = skipped_in_a_row = 0
        # This process's local batches are start, start + 1, … (the loader takes its workers
        # round-robin); local batch k is global batch k·world_size + rank.
        local = self.start + worker
        while True:
            epoch, records = self.batch_records(local * self.world_size + self.rank)
            trajectories, seeds = [], []
            for record in records:
                file, line = self.index[record]
                try:
                    if file not in lines:
                        lines[file] = self._shard(file)
                    trajectories.append(self._read(file, line, lines[file]))
                    seeds.append(
                        int(np.random.SeedSequence([self.seed, epoch, record]).generate_state(1)[0])
                    )
                    skipped_in_a_row = 0
                except TrajectoryError as err:
                    if not self.skip_invalid:
                        raise
                    skipped += 1
                    skipped_in_a_row += 1
                    log.warning(
                        "skipped invalid record (%d so far in worker %d): %s", skipped, worker, err
                    )
                    if skipped_in_a_row >= len(self.index):
                        raise TrajectoryError(
                            f"{self.root}: {skipped_in_a_row} invalid records in a row, as many "
                            "as the data set holds: nothing to train on (skip_invalid skips bad "
                            f"records, it cannot make a batch without good ones); last: {err}"
                        ) from None
            if trajectories:
                yield self.packer(trajectories, seeds) if self.packer else trajectories
            local += workers

    def _shard(self, file: str) -> list[bytes]:
        """The shard's lines, once its bytes match the manifest's SHA-256 (data sets built before
        checksums carry none and are read as they are)."""
        data = (self.root / file).read_bytes()
        entry = next(s for s in self.manifest["shards"] if s["file"] == file)
        want = entry.get("sha256")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise TrajectoryError(
                f"{self.root / file}: its SHA-256 is not the one manifest.json records (a shard "
                "from another build, or changed since): its records cannot be trusted to match "
                "their images"
            )
        return data.splitlines()

    def _read(self, file: str, line: int, lines: list[bytes]) -> Trajectory:
        where = f"{self.root / file}:{line + 1}"
        if line >= len(lines):
            raise TrajectoryError(
                f"{where}: missing: the shard has {len(lines)} lines where manifest.json "
                "says it has more (a truncated or replaced shard)"
            )
        try:
            record = json.loads(lines[line].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise TrajectoryError(
                f"{where}: not UTF-8 (byte {err.object[err.start]:#04x} at column {err.start + 1})"
            ) from None
        except json.JSONDecodeError as err:
            raise TrajectoryError(
                f"{where}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        trajectory = record_to_trajectory(record, self.root, where)
        side = self.manifest.get("resolution")
        for k, segment in enumerate(trajectory.segments):
            if segment.is_image and side and segment.image.size != (side, side):
                w, h = segment.image.size
                raise TrajectoryError(
                    f"{where}: segments[{k}]: a {w}×{h} image where manifest.json says "
                    f"{side}×{side}"
                )
        return trajectory


def read_manifest(root: Path) -> dict:
    """The data set's manifest, checked for its format version."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (build the data with `python -m avr.data build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not a valid manifest ({err}); rebuild the data") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: not a manifest (no 'shards' list); rebuild the data")
    for shard in manifest["shards"]:
        if not (Path(root) / str(shard.get("file"))).is_file():
            raise FileNotFoundError(
                f"{Path(root) / str(shard.get('file'))}: missing, though manifest.json lists it"
            )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


class StreamPosition(L.LightningDataModule):
    """A data module over an endless seeded stream: it counts the batches the trainer received
    (the resume position, saved in checkpoints) and knows its rank's share of the stream."""

    seed: int
    batches_seen: int = 0

    def shard(self) -> tuple[int, int]:
        """`(rank, world size)` of this process (`(0, 1)` outside a trainer)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the batches the trainer actually received."""
        self.batches_seen += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ResumeError(
                f"--ckpt_path: the checkpoint's data seed {state['seed']} differs from this run's "
                f"{self.seed}; a resumed run must draw the same batches"
            )
        self.batches_seen = int(state["batches_seen"])


class ResumeError(ValueError):
    """A checkpoint given to `--ckpt_path` does not fit the run it would resume (another module,
    model or data build): resuming would continue silently on something else."""


class TrajectoryDataModule(StreamPosition):
    """Training batches from a data set built by `python -m avr.data build`."""

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        skip_invalid: bool = False,
    ) -> None:
        """`path`: the data folder; `batch_size`: trajectories per batch (packed into rows);
        `skip_invalid`: log and skip bad records instead of stopping."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: expected ≥ 1 trajectories, got {batch_size}")
        self.path, self.batch_size, self.seed = path, batch_size, seed
        self.num_workers, self.shuffle, self.skip_invalid = num_workers, shuffle, skip_invalid
        self.packer: Callable | None = None  # set by the training module (it knows the backbone)
        self.batches_seen = 0

    def state_dict(self) -> dict[str, Any]:
        """The stream position and the data build it reads (`build_id` of its manifest)."""
        return {**super().state_dict(), "build_id": read_manifest(Path(self.path)).get("build_id")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream, on the same data build only."""
        saved, now = state.get("build_id"), read_manifest(Path(self.path)).get("build_id")
        if saved is not None and saved != now:
            raise ResumeError(
                f"--ckpt_path: the checkpoint was trained on data build {saved}, and "
                f"{self.path} now holds build {now} (rebuilt differently since?): the same "
                "batches cannot follow; rebuild it with the command that made it, or start anew"
            )
        super().load_state_dict(state)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.shard()
        stream = TrajectoryStream(
            self.path,
            self.batch_size,
            self.seed,
            self.shuffle,
            self.skip_invalid,
            self.packer,
            self.batches_seen,
            rank,
            world,
        )
        return DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )
