"""The hierarchical data pipeline: ShapeWorld samples by complexity level → teacher trajectories
(or trajectories drawn by a model and corrected by the teacher, `avr.data.self_sample`) → sharded
JSONL + PNG with a manifest.

```
DIR/manifest.json          format version, `build_id` (a hash of the shards and images), seed, mix,
                           split, mode, each shard's size and SHA-256, counts per mode/level/tag,
                           the adaptive labels per level and where they came from; from a model:
                           `from_model` (images drawn and right, critiques and views balanced)
DIR/shard-00000.jsonl      one trajectory per line (see `avr.sequence.trajectory_to_record`)
DIR/images/…png            their images
DIR/.avr-output            the marker that lets `--overwrite` replace this folder later
```

Teacher data regenerates from the seed: sample `i` uses the generator `(seed, i)`, so any record
can be rebuilt alone and no data set needs committing; data from a model regenerates from the seed
and the model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from avr.data.self_sample import SelfSampleActor, critique_views, without_critique_loss
from avr.data.teacher import ShapeWorldTeacher
from avr.outputs import check_replaceable, mark, publish, staging_dir
from avr.policy import SamplingConfig
from avr.registry import MODES
from avr.rollout import Job, rollout, rollout_seed
from avr.sequence import FORMAT_VERSION, Trajectory, trajectory_to_record
from avr.world import PLANNING_TAGS, PromptSpec, complexity, sample_scene, sample_spec
from avr.world.split import draw_in_split

#: The tool name in a data folder's `.avr-output` marker (`build` and `merge` alike).
DATA_TOOL = "avr data"

#: Tags that produce each complexity level (the level is checked on every spec).
LEVEL_TAGS = {
    "simple": ("single_object", "two_object", "colors"),
    "medium": ("counting", "position", "color_attr"),
    "complex": PLANNING_TAGS,
}


def parse_mix(text: str) -> dict[str, float]:
    """`simple=0.3,medium=0.4,complex=0.3` → weights that sum to 1."""

    def check(level: str) -> None:
        if level not in LEVEL_TAGS:
            raise ValueError(f"--mix: unknown level {level!r}; expected {', '.join(LEVEL_TAGS)}")

    return _weights(text, "--mix", check)


def parse_modes(text: str) -> dict[str, float]:
    """`adaptive` → {adaptive: 1}; `adaptive=0.6,reflect=0.4` → a mixture of modes, weights
    summing to 1. Every name must be a registered mode whose trajectories can be trained on."""
    if "=" not in text:
        _trainable(text.strip())
        return {text.strip(): 1.0}
    return _weights(text, "--mode", _trainable)


def _trainable(name: str) -> None:
    if not MODES.get(name).trainable:
        raise ValueError(
            f"--mode {name}: its trajectories hold several contexts and cannot be trained on "
            "(an inference-time mode; its tries are learned as reflect trajectories)"
        )


def _weights(text: str, flag: str, check: Callable[[str], object]) -> dict[str, float]:
    """`a=0.3,b=0.7` → weights that sum to 1; `check(name)` raises for a name `flag` cannot take."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        check(name.strip())
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(
                f"{flag}: weight of {name.strip()!r} must be a number, got {weight!r}"
            ) from None
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"{flag}: weights must be non-negative with a positive sum, got {text!r}")
    return {name: w / total for name, w in weights.items()}


@dataclass(frozen=True)
class FromModel:
    """How a build draws from a model (`avr data build --from-model`): every image of a trajectory
    is `model`'s own (`avr.data.self_sample`), drawn with `sampling` (default: 10 ODE steps)
    `batch` episodes at a time, and the teacher only judges and corrects (a reflect trajectory's
    first `own_refines` refines are the model's too). `source` names the model in the manifest.

    - `balance`: within each shard and level, trajectories whose first critique judges a right
      image and those whose first critique judges a wrong one are balanced: the larger side keeps
      at most `balance` times as many as the smaller (so fewer than `n` may be written; the
      manifest counts what was drawn, kept and dropped; None keeps everything).
    - `views`: critiques are learned from critique views instead
      (`avr.data.self_sample.critique_views`: each critique of an image the model drew, alone, the
      trajectory before it read), balanced per level, position (first try or refine) and verdict;
      every whole trajectory is kept, its critiques read, not trained, and teaches the rest (mode
      labels, plans, the images the verifier accepts, refines).
    - `tries` > 1: the model answers a `direct` trajectory's prompt up to `tries` times (each from
      its own seed) and the first answer the verifier accepts is kept: rejection-sampling
      fine-tuning on the model's own successes. A prompt none of whose tries is right keeps the
      teacher's render, or with `drop_unsolved` is left out."""

    model: Any
    source: str = ""
    sampling: SamplingConfig | None = None
    balance: float | None = 1.0
    batch: int = 32
    own_refines: int = 1
    views: bool = False
    tries: int = 1
    drop_unsolved: bool = False

    def __post_init__(self) -> None:
        if self.balance is not None and self.balance < 1:
            raise ValueError(
                f"--balance must be ≥ 1 (the larger side over the smaller), got {self.balance}"
            )
        if self.tries < 1:
            raise ValueError(f"--tries: expected ≥ 1 answers per direct prompt, got {self.tries}")
        if self.batch < 1:
            raise ValueError(f"--batch: expected ≥ 1 episodes at once, got {self.batch}")

    def settings(self) -> dict:
        """What the manifest's `from_model` records of these settings."""
        return {
            "model": self.source,
            "sampling": vars(self.sampling or SELF_SAMPLING),
            "balance": self.balance,
            "own_refines": self.own_refines,
            "views": self.views,
            "tries": self.tries,
            "drop_unsolved": self.drop_unsolved,
        }


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
    *,
    describe_critiques: bool = False,
    own: FromModel | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write `n` trajectories of `mode` (a registered mode, or a mixture `adaptive=0.6,reflect=0.4`)
    of prompts from `split` to the new folder `out` (staged beside it; `overwrite` replaces only an
    earlier data folder); returns the manifest. `labeler(mode, spec)` (`ModeLabeler`) labels
    adaptive trajectories with the cheapest mode that succeeds for a model instead of by level
    (`label_source` says which). `describe_critiques`: every critique opens with a `<des>` of what
    the verifier sees on the canvas (`avr.data.critique.read_canvas`). With `own` (`FromModel`) a
    model draws every image and the teacher judges and corrects. `progress(k)` is called as samples finish."""
    out = Path(out)
    _check_request(out, n, overwrite, own, labeler)
    modes = parse_modes(mode)
    sample = partial(
        _sample,
        seed=seed,
        levels=_draws(mix, n, [seed, 2**31]),
        modes=_draws(modes, n, [seed, 2**31 + 1]),
        mode_objs={name: MODES.get(name)() for name in modes},
        split=split,
        teacher=partial(
            ShapeWorldTeacher,
            mode_succeeds=labeler,
            resolution=resolution,
            sketch_error_rate=sketch_error_rate,
            describe_critiques=describe_critiques,
        ),
    )
    tmp = staging_dir(out)
    try:
        shards, tally, stats = _write_shards(tmp, n, shard_size, sample, own, seed, progress)
        manifest = {
            "format_version": FORMAT_VERSION,
            "build_id": content_id(tmp, shards),
            "seed": seed,
            "n": sum(s["records"] for s in shards),
            "requested": n,
            "mix": mix,
            "split": split,
            "mode": mode if len(modes) == 1 else modes,
            "resolution": resolution,
            "sketch_error_rate": sketch_error_rate,
            "describe_critiques": describe_critiques,
            "shards": shards,
            **tally.summary(label_source),
        }
        if own is not None:
            manifest["from_model"] = {**own.settings(), **stats.summary()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        mark(tmp, DATA_TOOL)
        publish(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_shards(tmp: Path, n, shard_size, sample, own, seed, progress) -> tuple:
    """Build and write the shards of samples `0 … n − 1` (`sample(i)`) into `tmp`: by the teacher,
    or (`own`) drawn by the model; returns the shards' manifest entries, the tally of what they
    hold and, from a model, what it drew."""
    tally = _Tally()
    stats = SelfSampleStats() if own is not None else None
    shards = []
    for start in range(0, n, shard_size):
        samples = [sample(i) for i in range(start, min(n, start + shard_size))]
        if own is None:
            built = []
            for i, spec, teacher, mode_obj in samples:
                built.append((f"{i:07d}", mode_obj.build(teacher, spec)))
                if progress is not None:
                    progress(1)
        else:
            built = _kept(own, stats, _from_model(own, samples, seed, progress))
        lines = []
        for key, trajectory in built:
            lines.append(json.dumps(trajectory_to_record(trajectory, key, tmp)))
            tally.add(trajectory)
        shards.append(write_shard(tmp / f"shard-{len(shards):05d}.jsonl", lines))
    return shards, tally, stats


def _draws(weights: dict[str, float], n: int, key: list[int]) -> list[str]:
    """`n` names drawn by `weights` from the stream `key` (one name: every draw is it)."""
    names = list(weights)
    if len(names) == 1:
        return names * n
    rng = np.random.default_rng(key)
    return [str(x) for x in rng.choice(names, size=n, p=list(weights.values()))]


def _sample(i: int, seed, levels, modes, mode_objs, split, teacher) -> tuple:
    """Prompt `i` of a build: its spec (of level `levels[i]`, from `split`), its teacher (from
    the generator `(seed, i)`, which draws the spec and the scene too) and its mode object."""
    rng = np.random.default_rng([seed, i])
    tag = str(rng.choice(LEVEL_TAGS[levels[i]]))
    spec = draw_in_split(partial(sample_spec, tag), split, rng)
    if complexity(spec).level != levels[i]:
        raise AssertionError(f"tag {spec.tag} gave level {complexity(spec).level}")
    scene = sample_scene(spec, rng)
    return i, spec, teacher(scene, rng), mode_objs[modes[i]]


def _check_request(out: Path, n: int, overwrite: bool, own, labeler) -> None:
    """Refuse a build whose options contradict each other, or whose output it may not write."""
    if own is not None and labeler is not None:
        raise ValueError("labels from a model (--label-model) with --from-model: not supported")
    if n < 1:
        raise ValueError(f"--n: expected ≥ 1 trajectories, got {n}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out}: exists; a data build writes a new folder (--overwrite replaces an "
                "earlier data build)"
            )
        check_replaceable(out, DATA_TOOL, [own.source] if own and own.source else [])


def _kept(own: FromModel, stats: SelfSampleStats, drawn: list) -> list[tuple[str, Trajectory]]:
    """What a shard of the model's trajectories keeps: balanced whole trajectories, or (`views`)
    every whole one with its critiques read, then the balanced critique views; without the direct
    prompts the model never answered right where `drop_unsolved`."""
    if own.views:
        built = [(key, without_critique_loss(t)) for key, t in stats.balance(drawn, None)]
        every_view = [
            (f"{key}v{k}", v) for key, t in drawn for k, v in enumerate(critique_views(t))
        ]
        built += stats.balance_views(every_view, own.balance)
    else:
        built = stats.balance(drawn, own.balance)
    if own.drop_unsolved:
        built = [(key, t) for key, t in built if t.meta.get("solved", True)]
    return built


@dataclass
class _Tally:
    """The manifest's counts of written records (per mode, level and tag; critique views count as
    the mode "critique view") and the mode each level's whole trajectories follow."""

    counts: dict[str, Counter] = field(
        default_factory=lambda: {"mode": Counter(), "level": Counter(), "tag": Counter()}
    )
    labels: dict[str, Counter] = field(default_factory=dict)

    def add(self, trajectory: Trajectory) -> None:
        level, view = trajectory.meta["level"], "view" in trajectory.meta
        self.counts["mode"]["critique view" if view else trajectory.meta["mode"]] += 1
        self.counts["level"][level] += 1
        self.counts["tag"][trajectory.meta["spec"]["tag"]] += 1
        if not view:
            self.labels.setdefault(level, Counter())[trajectory.meta["mode"]] += 1

    def summary(self, label_source: str) -> dict:
        return {
            "counts": {k: dict(sorted(v.items())) for k, v in self.counts.items()},
            "labels": {
                "source": label_source,
                "by_level": {lv: dict(sorted(c.items())) for lv, c in sorted(self.labels.items())},
            },
        }


def write_shard(path: Path, lines: list[str]) -> dict:
    """Write one JSON record per line to `path`; returns its manifest entry: file name, number of
    records and the SHA-256 of its bytes (checked when the shard is read)."""
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(data)
    return {"file": path.name, "records": len(lines), "sha256": hashlib.sha256(data).hexdigest()}


def content_id(root: Path, shards: list[dict]) -> str:
    """What a data folder holds, in 16 hex digits: a SHA-256 over its shards' checksums and its
    images' bytes. A rebuild that writes the same data has the same id (the same seed regenerates
    it), anything else another; a checkpoint records it to resume only on the data it was on."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard["sha256"].encode())
    images = root / "images"
    for path in sorted(images.iterdir()) if images.is_dir() else ():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


#: The `avr.rollout.rollout_seed` sample index of the model's first try at prompt `i` (its k-th
#: try: `FIRST_TRY + k`).
FIRST_TRY = 7
#: How the model draws its own images for data: the ODE, as evaluation samples them.
SELF_SAMPLING = SamplingConfig(steps=10, temperature=0.0)


def _from_model(own: FromModel, samples, seed, progress) -> list[tuple[str, Trajectory]]:
    """Roll the samples out through the engine, the model drawing and the teacher writing. A
    `direct` sample is tried again (from a new seed, with a fresh copy of its teacher) while its
    answer is wrong, up to `own.tries` times; the kept trajectory's meta counts every try's images
    and says whether one was right (`solved`) and after how many tries (`tries`)."""
    model, batch, tries = own.model, own.batch, own.tries
    out: dict[int, Trajectory] = {}
    pending = list(range(len(samples)))
    for attempt in range(tries):
        jobs, teachers = [], {}
        for k in pending:
            i, spec, teacher, mode_obj = samples[k]
            jobs.append(Job(mode_obj, spec, rollout_seed(seed, i, FIRST_TRY + attempt)))
            teachers[id(jobs[-1])] = teacher if attempt == tries - 1 else copy.deepcopy(teacher)

        def actor(job, sampling, generator, open_session, teachers=teachers):
            return SelfSampleActor(
                model, sampling, generator, open_session, teachers[id(job)], own.own_refines
            )

        drawn = []
        for first in range(0, len(jobs), batch):
            chunk = jobs[first : first + batch]
            drawn.extend(rollout(model, chunk, own.sampling or SELF_SAMPLING, batch, actor=actor))
        still = []
        for k, trajectory in zip(pending, drawn, strict=True):
            trajectory.meta["solved"] = _solved(trajectory)
            trajectory.meta["tries"] = attempt + 1
            earlier = out.get(k)
            if earlier is not None:
                for key in ("model_images", "model_images_right"):
                    trajectory.meta[key] += earlier.meta[key]
            out[k] = trajectory
            if trajectory.meta["mode"] == "direct" and not trajectory.meta["solved"]:
                still.append(k)
            elif progress is not None:
                progress(1)
        pending = still
        if not pending:
            break
    if progress is not None and pending:
        progress(len(pending))
    return [(f"{samples[k][0]:07d}", out[k]) for k in range(len(samples))]


def _solved(trajectory: Trajectory) -> bool:
    """Whether the trajectory's answer (its last image) is the model's own, accepted."""
    last = next(s for s in reversed(trajectory.segments) if s.is_image)
    return last.meta.get("drawn_by") == "model"


@dataclass
class SelfSampleStats:
    """What a build from the model's own samples drew and kept: images the model drew and how
    many the verifier accepted, per level; first critiques judging right and wrong images before
    and after balancing; how refine targets were made."""

    drawn: Counter = field(default_factory=Counter)
    right: Counter = field(default_factory=Counter)
    critiques: dict[str, Counter] = field(
        default_factory=lambda: {"drawn": Counter(), "kept": Counter()}
    )
    refine_targets: Counter = field(default_factory=Counter)
    views: dict[str, Counter] = field(
        default_factory=lambda: {"drawn": Counter(), "kept": Counter()}
    )

    def balance(
        self, built: list[tuple[str, Trajectory]], ratio: float | None
    ) -> list[tuple[str, Trajectory]]:
        """Count `built`, then keep, per level, at most `ratio` × as many trajectories whose first
        critique says "right" as "wrong" (and the other way round; a level with no right image
        keeps no critique); trajectories without a critique are all kept, and everything when
        `ratio` is None. Order is kept."""
        sides: dict[tuple[str, bool], list[int]] = {}
        for k, (_, t) in enumerate(built):
            level, meta = t.meta["level"], t.meta
            self.drawn[level] += meta["model_images"]
            self.right[level] += meta["model_images_right"]
            self.refine_targets.update(meta["refine_targets"])
            if meta["critiques"]:
                side = (level, bool(meta["critiques"][0]))
                sides.setdefault(side, []).append(k)
                self.critiques["drawn"][f"{level}/{'right' if side[1] else 'wrong'}"] += 1
        dropped = set()
        for level in {lv for lv, _ in sides} if ratio is not None else ():
            ok, wrong = sides.get((level, True), []), sides.get((level, False), [])
            cap = math.ceil(ratio * min(len(ok), len(wrong)))
            for side in (ok, wrong):
                dropped.update(side[cap:])
        kept = [item for k, item in enumerate(built) if k not in dropped]
        for _, t in kept:
            if t.meta["critiques"]:
                verdict = "right" if t.meta["critiques"][0] else "wrong"
                self.critiques["kept"][f"{t.meta['level']}/{verdict}"] += 1
        return kept

    def balance_views(
        self, views: list[tuple[str, Trajectory]], ratio: float | None
    ) -> list[tuple[str, Trajectory]]:
        """Keep, per level and position, at most `ratio` × as many critique views saying "right" as
        "wrong" and the other way round (none where one verdict never occurs; all when `ratio` is
        None); count them. Order is kept."""
        groups: dict[tuple[str, str], dict[bool, list[int]]] = {}
        for k, (_, view) in enumerate(views):
            level, position, ok = (
                view.meta["level"],
                view.meta["view"]["position"],
                view.meta["view"]["ok"],
            )
            groups.setdefault((level, position), {True: [], False: []})[ok].append(k)
            self.views["drawn"][_view_key(view)] += 1
        keep = set(range(len(views)))
        if ratio is not None:
            for sides in groups.values():
                cap = math.ceil(ratio * min(len(sides[True]), len(sides[False])))
                keep -= {k for side in sides.values() for k in side[cap:]}
        kept = [item for k, item in enumerate(views) if k in keep]
        self.views["kept"].update(_view_key(view) for _, view in kept)
        return kept

    def summary(self) -> dict:
        """The manifest's `from_model` figures."""
        drawn, right = sum(self.drawn.values()), sum(self.right.values())
        return {
            "images_drawn": drawn,
            "images_right": right,
            "accuracy": right / drawn if drawn else None,
            "accuracy_by_level": {
                lv: self.right[lv] / self.drawn[lv] for lv in sorted(self.drawn) if self.drawn[lv]
            },
            "first_critiques": {k: dict(sorted(c.items())) for k, c in self.critiques.items()},
            "refine_targets": dict(self.refine_targets),
            "critique_views": {k: dict(sorted(c.items())) for k, c in self.views.items()},
        }


def _view_key(view: Trajectory) -> str:
    """`level/position/right` (or `wrong`): how the manifest counts a critique view."""
    where = view.meta["view"]
    return f"{view.meta['level']}/{where['position']}/{'right' if where['ok'] else 'wrong'}"
