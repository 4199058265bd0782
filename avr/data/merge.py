"""`python -m avr.data merge A B … -o OUT`: one data folder from several builds (a round of
self-improvement trains on its own samples beside the earlier rounds').

Each source's records keep their content; their keys and image files are prefixed with the
source's position (`s0-`, `s1-`, …), so builds whose keys collide (every build numbers from 0) do
not overwrite each other. Images are hard-linked where the file system allows, else copied. The
manifest lists the shards in order, sums the counts and records each source's manifest under
`sources`. The output is written beside its destination and renamed into place; an existing
destination is refused (with `--overwrite`, an earlier data folder is replaced).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from avr.data.build import DATA_TOOL, content_id, write_shard
from avr.data.datamodule import read_manifest
from avr.outputs import check_replaceable, mark, publish, staging_dir
from avr.sequence import FORMAT_VERSION


def merge(
    sources: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False
) -> dict:
    """Merge the data folders `sources` into `out` (which must not exist, or with `overwrite` be
    an earlier data folder holding none of `sources`); returns the manifest."""
    out = Path(out)
    if len(sources) < 2:
        raise ValueError(f"merge needs at least two data folders, got {len(sources)}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out}: exists; merge writes a new folder (--overwrite replaces an earlier data "
                "folder)"
            )
        check_replaceable(out, DATA_TOOL, sources)
    manifests = [read_manifest(Path(s)) for s in sources]
    resolutions = {m.get("resolution") for m in manifests}
    if len(resolutions) > 1:
        sizes = ", ".join(
            f"{s}: {m.get('resolution')}" for s, m in zip(sources, manifests, strict=True)
        )
        raise ValueError(f"merge: the folders' images differ in resolution ({sizes})")
    tmp = staging_dir(out)
    try:
        merged = _write(tmp, sources, manifests, resolutions.pop())
        mark(tmp, DATA_TOOL)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return merged


def _write(tmp: Path, sources: list, manifests: list[dict], resolution: int) -> dict:
    """Write the merged shards, images and manifest into `tmp`; returns the manifest."""
    (tmp / "images").mkdir()
    counts: dict[str, Counter] = {"mode": Counter(), "level": Counter(), "tag": Counter()}
    shards = []
    for k, (source, manifest) in enumerate(zip(map(Path, sources), manifests, strict=True)):
        prefix = f"s{k}-"
        for shard in manifest["shards"]:
            lines = []
            text = (source / shard["file"]).read_text(encoding="utf-8")
            for n, line in enumerate(text.splitlines(), 1):
                record = json.loads(line)
                record["key"] = prefix + str(record["key"])
                for segment in record["segments"]:
                    if segment.get("type") == "image":
                        name = f"images/{prefix}{Path(segment['image']).name}"
                        _link(
                            source / segment["image"], tmp / name, f"{source / shard['file']}:{n}"
                        )
                        segment["image"] = name
                lines.append(json.dumps(record))
            shards.append(write_shard(tmp / f"shard-{len(shards):05d}.jsonl", lines))
        for key, counter in counts.items():
            counter.update(manifest.get("counts", {}).get(key, {}))
    merged = {
        "format_version": FORMAT_VERSION,
        "build_id": content_id(tmp, shards),
        "n": sum(s["records"] for s in shards),
        "resolution": resolution,
        "shards": shards,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "sources": [
            {"path": str(s), "manifest": m} for s, m in zip(sources, manifests, strict=True)
        ],
    }
    (tmp / "manifest.json").write_text(json.dumps(merged, indent=2), encoding="utf-8")
    return merged


def _link(source: Path, target: Path, where: str) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{where}: image {source} not found")
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
