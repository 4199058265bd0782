"""Checkpoint files written atomically beside their destination.

Lightning's own writer stages a checkpoint through fsspec's transaction, whose temporary file lives
in `TMPDIR`; when that is another filesystem (`/dev/shm`, a node-local disk), the final "move" is
a copy, and a kill during it leaves a truncated checkpoint under its final name. `AtomicCheckpointIO`
writes the bytes to a hidden temporary file in the destination's own folder, flushes them to disk,
and renames it into place (atomic on one filesystem), so a checkpoint is whole or absent. Temporary
files that a killed run left behind are removed at the next save into that folder. `avr.fit`
installs it on strategies that use Lightning's default writer; remote paths (`s3://…`) keep
Lightning's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: the temporary name of checkpoint `NAME`: `.NAME.tmp-<pid>` in the same folder
TMP_MARK = ".tmp-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes beside the destination and renames (see the module)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent)
        tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary checkpoint files of killed runs in `folder`; returns them."""
    stale = [p for p in folder.glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
