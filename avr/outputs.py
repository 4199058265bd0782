"""Output folders of the command-line tools: a run writes into an empty folder, never over the
leftovers of another (which a later scoring pass would count as its own)."""

from __future__ import annotations

import shutil
from pathlib import Path


def fresh_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create `path` (and parents) if missing and return it. A folder that already holds files is
    refused (`FileExistsError` naming it and what it holds) unless `overwrite`, which empties it
    first; the working directory, the home folder, a filesystem root and a folder with `.git` are
    never emptied."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: the output must be a folder, and this is a file")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
        if not overwrite:
            raise FileExistsError(
                f"{out}: the output folder is not empty ({len(held)} entries: {shown}); its "
                "leftovers would be mixed with this run's. Pass --overwrite to empty it first, "
                "or choose a new folder"
            )
        resolved = out.resolve()
        if (
            resolved in (Path.cwd().resolve(), Path.home().resolve())
            or resolved == Path(resolved.anchor)
            or (resolved / ".git").exists()
        ):
            raise PermissionError(f"{out}: --overwrite will not empty this folder; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
