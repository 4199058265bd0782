"""The hierarchical data pipeline: ShapeWorld samples by complexity level → teacher trajectories →
sharded JSONL + PNG with a manifest.

```
DIR/manifest.json          format version, seed, mix, split, mode, shard sizes, counts per
                           mode/level/tag, the adaptive labels per level and where they came from
DIR/shard-00000.jsonl      one trajectory per line (see `avr.sequence.trajectory_to_record`)
DIR/images/…png            their images
```

Everything regenerates from the seed: sample `i` uses the generator `(seed, i)`, so any record can
be rebuilt alone and no data set needs committing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from avr.data.teacher import ShapeWorldTeacher
from avr.registry import MODES
from avr.sequence import FORMAT_VERSION, trajectory_to_record
from avr.world import PLANNING_TAGS, PromptSpec, complexity, sample_scene, sample_spec
from avr.world.split import draw_in_split

#: Tags that produce each complexity level (the level is checked on every spec).
LEVEL_TAGS = {
    "simple": ("single_object", "two_object", "colors"),
    "medium": ("counting", "position", "color_attr"),
    "complex": PLANNING_TAGS,
}


def parse_mix(text: str) -> dict[str, float]:
    """`simple=0.3,medium=0.4,complex=0.3` → weights that sum to 1."""
    mix = {}
    for part in text.split(","):
        level, _, weight = part.partition("=")
        if level.strip() not in LEVEL_TAGS:
            raise ValueError(
                f"--mix: unknown level {level.strip()!r}; expected {', '.join(LEVEL_TAGS)}"
            )
        try:
            mix[level.strip()] = float(weight)
        except ValueError:
            raise ValueError(
                f"--mix: weight of {level.strip()!r} must be a number, got {weight!r}"
            ) from None
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError(f"--mix: weights must be non-negative with a positive sum, got {text!r}")
    return {level: w / total for level, w in mix.items()}


def build(
    out: str | os.PathLike,
    n: int,
    mix: dict[str, float],
    seed: int = 0,
    mode: str = "adaptive",
    shard_size: int = 500,
    resolution: int = 64,
    sketch_error_rate: float = 0.2,
    split: str = "train",
    labeler: Callable[[str, PromptSpec], bool] | None = None,
    label_source: str = "complexity",
) -> dict:
    """Write `n` teacher trajectories of `mode` to `out` (replaced atomically); returns the manifest.
    Prompts come from `split` (`train` by default: no held-out combination, `avr.world.split`).
    `labeler(mode, spec)` (e.g. `avr.data.labels.ModeLabeler`) labels adaptive trajectories with
    the cheapest mode that succeeds for a model instead of by complexity level; the manifest
    records the labels per level and their `label_source`."""
    out = Path(out)
    mode_obj = MODES.get(mode)()
    levels = list(mix)
    level_of = np.random.default_rng([seed, 2**31]).choice(
        levels, size=n, p=[mix[lv] for lv in levels]
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: dict[str, Counter] = {"mode": Counter(), "level": Counter(), "tag": Counter()}
    labels: dict[str, Counter] = {}  # level → mode the trajectory follows
    shards = []
    for start in range(0, n, shard_size):
        lines = []
        for i in range(start, min(n, start + shard_size)):
            rng = np.random.default_rng([seed, i])
            tag = str(rng.choice(LEVEL_TAGS[level_of[i]]))
            spec = draw_in_split(partial(sample_spec, tag), split, rng)
            level = complexity(spec).level
            if level != level_of[i]:
                raise AssertionError(f"tag {spec.tag} gave level {level}, expected {level_of[i]}")
            teacher = ShapeWorldTeacher(
                sample_scene(spec, rng),
                rng,
                resolution,
                sketch_error_rate,
                mode_succeeds=labeler,
            )
            trajectory = mode_obj.build(teacher, spec)
            lines.append(json.dumps(trajectory_to_record(trajectory, f"{i:07d}", tmp)))
            for key, value in (
                ("mode", trajectory.meta["mode"]),
                ("level", level),
                ("tag", spec.tag),
            ):
                counts[key][value] += 1
            by_level = labels.setdefault(level, Counter())
            by_level[trajectory.meta["mode"]] += 1
        name = f"shard-{len(shards):05d}.jsonl"
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        shards.append({"file": name, "records": len(lines)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n": n,
        "mix": mix,
        "split": split,
        "mode": mode,
        "resolution": resolution,
        "sketch_error_rate": sketch_error_rate,
        "shards": shards,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "labels": {
            "source": label_source,
            "by_level": {lv: dict(sorted(c.items())) for lv, c in sorted(labels.items())},
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest
