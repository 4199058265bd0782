"""GenEval's output layout, and scoring a folder in it with the ShapeWorld verifier.

```
OUT/00000/metadata.jsonl     the prompt's spec, one line
OUT/00000/samples/0000.png   its images, whoever drew them
OUT/results.jsonl            written by `score_folder`: one line per image
```

Every prompt folder must hold at least one image, and every file in `samples/` must be a readable
square PNG of at least 16 px; anything else is an error naming the file (`allow_missing`: counted
as a failed image, with the reason, instead). Images with transparency are composited over the
white ShapeWorld canvas first, so a fully transparent image is a blank canvas, not a black one.

The summary follows GenEval's `summary_scores.py`: accuracy per tag is the mean of `correct` over that
tag's images, and the overall accuracy is the mean over tags (each tag weighs the same).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from avr.sequence import open_image
from avr.world.complexity import LEVELS, complexity
from avr.world.spec import PromptSpec, SpecError, check_spec_vocabulary, iter_specs
from avr.world.verify import Verifier


def prompt_dir(out: str | os.PathLike, index: int) -> Path:
    """`OUT/<index:05d>`."""
    return Path(out) / f"{index:05d}"


def write_prompt(out: str | os.PathLike, index: int, spec: PromptSpec, images: list[Image.Image]):
    """Write one prompt's metadata and its images `samples/0000.png`, …"""
    folder = prompt_dir(out, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(spec.to_line() + "\n", encoding="utf-8")
    for k, image in enumerate(images):
        image.save(folder / "samples" / f"{k:04d}.png")


def iter_prompts(out: str | os.PathLike) -> Iterator[tuple[str, PromptSpec, list[Path]]]:
    """Yield `(metadata file:line, spec, sample paths)` for every prompt folder, in index order."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder")
    folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise FileNotFoundError(f"{out}: no prompt folders (00000/metadata.jsonl, …) inside")
    missing = sorted(set(range(int(folders[-1].name) + 1)) - {int(p.name) for p in folders})
    if missing:  # a lost prompt cannot be scored as failed: its spec went with it
        shown = ", ".join(prompt_dir(out, k).name for k in missing[:5])
        raise FileNotFoundError(
            f"{prompt_dir(out, missing[0])}: missing; prompt folders must run 00000 to "
            f"{folders[-1].name} without a gap ({len(missing)} absent: {shown})"
        )
    for folder in folders:
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: missing (every prompt folder needs its metadata)")
        specs = list(iter_specs(meta))
        if len(specs) != 1:
            raise SpecError(f"{meta}: expected exactly one spec line, found {len(specs)}")
        where, spec = specs[0]
        samples = sorted((folder / "samples").iterdir()) if (folder / "samples").is_dir() else []
        yield where, spec, samples


@dataclass(frozen=True)
class Summary:
    """Accuracy (strict) and partial score by tag and by complexity level, and the overall figures."""

    by_tag: dict[str, tuple[float, float, int]]  # tag -> (accuracy, partial score, images)
    by_level: dict[str, tuple[float, float, int]]
    overall: float  # mean over tags of the per-tag accuracy, as GenEval computes it
    overall_partial: float
    images: int


def score_folder(
    out: str | os.PathLike,
    verifier: Verifier | None = None,
    allow_missing: bool = False,
    report_as: str | os.PathLike | None = None,
) -> list[dict]:
    """Score every image under `out`, write `out/results.jsonl`, return its records. Each record's
    `filename` is the image's path, under `report_as` instead of `out` where given (the folder
    `out` is renamed to once it is finished).

    Every spec is checked against ShapeWorld's vocabulary before any image is scored, so a folder of
    real GenEval prompts fails at once, naming the first foreign class and where it is. A prompt
    without images, or an image that cannot be read (see the module docstring), is a `ValueError`
    naming it; with `allow_missing` it is recorded as a failed image (`correct: false`, `missing:
    true`, the reason) and counted.
    """
    verifier = verifier or Verifier()
    prompts = list(iter_prompts(out))
    for where, spec, _ in prompts:
        check_spec_vocabulary(spec, where)
    records = []
    named = (lambda path: Path(report_as) / Path(path).relative_to(out)) if report_as else Path
    for where, spec, samples in prompts:
        level = complexity(spec).level
        common = {"tag": spec.tag, "prompt": spec.prompt, "level": level}
        common["metadata"] = spec.to_line()
        if not samples:
            folder = Path(where.rsplit(":", 1)[0]).parent / "samples"
            samples = [folder]  # reported below as the missing image
        for path in samples:
            try:
                image = read_sample(path)
            except ValueError as err:
                if not allow_missing:
                    raise
                records.append(
                    {"filename": str(named(path)), **common, "correct": False, "reason": str(err),
                     "score": 0.0, "missing": True}
                )  # fmt: skip
                continue
            verdict = verifier.verify(image, spec)
            records.append(
                {
                    "filename": str(named(path)),
                    **common,
                    "correct": verdict.correct,
                    "reason": verdict.reason,
                    "score": verdict.score,
                }
            )
    target = Path(out) / "results.jsonl"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, target)
    return records


MIN_SIDE = 16


def read_sample(path: Path) -> Image.Image:
    """One sample as RGB: a readable, square PNG of at least `MIN_SIDE` px, transparency
    composited over white; anything else is a `ValueError` naming `path`."""
    path = Path(path)
    if path.name == "samples" and not path.is_file():  # a prompt folder without images
        raise ValueError(f"{path}: no PNG images (every prompt needs at least one)")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    image = open_image(path)
    kind = image.format
    if kind != "PNG":
        raise ValueError(f"{path}: a {kind} file; samples must be PNG")
    width, height = image.size
    if width != height or width < MIN_SIDE:
        raise ValueError(
            f"{path}: a {width}×{height} image; samples must be square and at least "
            f"{MIN_SIDE} px (ShapeWorld renders 64×64)"
        )
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image.convert("RGBA"))
    return image.convert("RGB")


def summarize(records: list[dict]) -> Summary:
    """Per-tag and per-level accuracy of scored records (from `score_folder` or results.jsonl)."""
    if not records:
        raise ValueError("no scored images to summarize")
    by_tag, by_level = _group(records, "tag"), _group(records, "level")
    levels = {level: by_level[level] for level in LEVELS if level in by_level}
    return Summary(
        by_tag=by_tag,
        by_level=levels,
        overall=sum(a for a, _, _ in by_tag.values()) / len(by_tag),
        overall_partial=sum(p for _, p, _ in by_tag.values()) / len(by_tag),
        images=len(records),
    )


def _group(records: list[dict], key: str) -> dict[str, tuple[float, float, int]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    return {
        name: (
            sum(r["correct"] for r in rs) / len(rs),
            sum(r["score"] for r in rs) / len(rs),
            len(rs),
        )
        for name, rs in groups.items()
    }
