"""Output folders of the command-line tools: a run writes into an empty folder, never over the
leftovers of another (which a later scoring pass would count as its own), and `--overwrite` empties
only a folder that an earlier run of the same tool wrote.

Every folder `fresh_output_dir` makes holds a marker, `.avr-output`, naming the tool that wrote it.
`--overwrite` refuses a folder without that tool's marker, the working directory or any folder
above it, the home folder, a filesystem root, a folder holding `.git`, and a folder holding one of
the command's own inputs (the prompt file, the model being evaluated)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

#: The file naming the tool that wrote an output folder.
MARKER = ".avr-output"


def fresh_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    tool: str,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Create `path` (and parents) if missing, mark it as `tool`'s and return it. A folder that
    already holds files is refused (`check_output_dir`) unless `overwrite`, which empties it first
    when `check_replaceable` allows."""
    out = Path(path)
    if check_output_dir(out, overwrite, tool=tool, inputs=inputs):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, tool)
    return out


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    tool: str,
    inputs: Iterable[str | os.PathLike] = (),
) -> bool:
    """Raise unless `path` may receive `tool`'s new output: it is missing or an empty folder, or,
    with `overwrite`, a folder `check_replaceable` lets go (`FileExistsError` naming it and what
    it holds otherwise). Returns whether something is there to replace; touches nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: the output must be a folder, and this is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    held = sorted(p.name for p in out.iterdir())
    shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
    if not overwrite:
        raise FileExistsError(
            f"{out}: the output folder is not empty ({len(held)} entries: {shown}); its "
            "leftovers would be mixed with this run's. Pass --overwrite to empty it first, "
            "or choose a new folder"
        )
    check_replaceable(out, tool, inputs)
    return True


def mark(folder: str | os.PathLike, tool: str) -> None:
    """Write `folder`'s marker: `tool` wrote it (what `check_replaceable` reads)."""
    (Path(folder) / MARKER).write_text(json.dumps({"tool": tool}) + "\n", encoding="utf-8")


def check_replaceable(
    out: str | os.PathLike, tool: str, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise `PermissionError` (naming `out` and why) unless `out` may be deleted to make room for
    `tool`'s new output: it must hold `tool`'s marker, and must not be or contain the working
    directory, the home folder, a filesystem root, a `.git` folder or any of `inputs`."""
    out = Path(out)
    resolved = out.resolve()
    refuse = f"{out}: --overwrite will not empty this folder"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise PermissionError(f"{refuse}: it holds the working directory; choose another")
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        raise PermissionError(f"{refuse}: it is the home folder or a filesystem root")
    if (resolved / ".git").exists():
        raise PermissionError(f"{refuse}: it holds a git repository (.git)")
    for given in inputs:
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise PermissionError(f"{refuse}: it holds this command's input {given}")
    marker = out / MARKER
    try:
        written_by = json.loads(marker.read_text(encoding="utf-8")).get("tool")
    except (OSError, ValueError, AttributeError):
        written_by = None
    if written_by != tool:
        raise PermissionError(
            f"{refuse}: it is not an earlier output of `{tool}` (no {MARKER} naming it inside); "
            "choose a new folder, or empty this one yourself"
        )


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's preemption, `kill`) exit through Python with status 143, so a
    command's staging folder is removed on the way out instead of left beside its output (only
    from the main thread, where signal handlers can be set)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def staging_dir(out: str | os.PathLike) -> Path:
    """A new folder beside `out` (its name starts with `.<out's name>.`) to write a whole output
    into before `publish` renames it into place: a failed command leaves no half-written `out`,
    and never touches a folder it did not make."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # the permissions a plain mkdir gives, not mkdtemp's private ones
    return tmp


def publish(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the finished folder `tmp` to `out`; an `out` already there (which the caller has
    checked may go) is renamed aside first and deleted only once `tmp` is in its place."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
    return out


def check_only_written(out: str | os.PathLike, written: Iterable[str], what: str) -> None:
    """Raise unless `out` is missing, or a folder holding nothing but entries named in `written`
    (what the new `what` writes, so an earlier one may be replaced); naming what else is there.
    The working directory and the folders above it are never replaced."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out}: the output must be a folder, and this is a file")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise PermissionError(f"{out}: holds the working directory; write {what} to a new folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in set(written))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out}: holds files {what} does not write ({shown}); an existing folder is replaced "
            "only when it holds an earlier one alone: choose a new folder"
        )
