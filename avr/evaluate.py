"""`python -m avr.evaluate --model DIR --prompts FILE --modes direct,reflect,plan,adaptive -o OUT`.

Rolls every prompt out with every mode (ODE sampling, greedy text) and writes per run, in
GenEval's output layout, `OUT/<mode>/<00000>/samples/0000.png` (the final image) with its
`metadata.jsonl`, so the official GenEval scorer can judge a real backbone's images, plus the whole
trajectories (`OUT/<mode>/trajectories/trajectories.jsonl`, readable with `avr.sequence`) and a
grid of the first ones (`trajectories.png`). Then it scores the images with the ShapeWorld verifier
and writes `OUT/metrics.json`, `OUT/report.md` and two plots: accuracy per tag (overall = mean over
tags, as GenEval computes it), per complexity level and per mode, against the compute each mode
spent per prompt (velocity evaluations, text tokens written, seconds). Beside GenEval's accuracy,
each run reports how closely its final images follow the prompt (`avr.world.fidelity`: colour and
shape precision, objects and extra objects per image, exact scenes), over all prompts and over the
seen and held-out ones separately (`avr.world.split`), and whether a mode's later images build on
its earlier ones (`BuildsOn`: the share of refines and next sketches that keep every object the
image before had right), and what decided each final image per level (`Outcomes`: exact, extra
objects, blank canvas, too few objects, wrong shape, colour, count or relation). `--model` repeated as `NAME=DIR` compares
models in one report (runs `OUT/<name>/<mode>`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from avr.backbone import UnifiedModel, from_pretrained
from avr.intervals import overall_interval, wilson
from avr.outputs import (
    check_output_dir,
    exit_cleanly_on_sigterm,
    mark,
    publish,
    staging_dir,
)
from avr.policy import SamplingConfig
from avr.protocol import Mode
from avr.registry import MODES
from avr.report import compare_runs, percent, plot_accuracy, plot_trajectories, report
from avr.rollout import Job, rollout, rollout_seed
from avr.sequence import Trajectory, trajectory_to_record
from avr.understanding import Understanding
from avr.world import LEVELS, PromptSpec, Verifier, complexity, load_specs
from avr.world.fidelity import BuildsOn, Fidelity, Outcomes
from avr.world.geneval import score_folder, summarize, write_prompt
from avr.world.spec import check_spec_vocabulary
from avr.world.split import is_held_out

#: The tool named in an evaluation folder's marker (`avr.outputs`).
TOOL = "avr evaluate"


def evaluate(
    models: Mapping[str, UnifiedModel],
    specs: list[PromptSpec],
    modes: Mapping[str, Mode],
    out: Path,
    sampling: SamplingConfig,
    seed: int = 0,
    grid_prompts: int = 8,
    workers: int = 1,
    batch: int = 32,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Roll out every prompt with every (model, mode), write images and trajectories, score, plot.

    `modes` maps a name to a mode instance (`{"reflect-k3": ReflectMode(rounds=3)}`, say) or to a
    `BestOf` baseline. Runs are labelled by mode name, or `<model>/<mode>` when there are several
    models; each run's outputs land in `out/<label>/`. `workers > 1` runs that many (model, mode)
    runs at once, in processes of one thread each (their `seconds` then count time shared with the
    others); each run rolls out `batch` episodes at a time through `avr.rollout`. Returns the
    metrics (also written to `out/metrics.json`).

    `out` must be missing or empty; `overwrite` replaces an earlier evaluation there (never a
    folder holding one of `inputs`: `avr.outputs.check_output_dir`). Everything is written into a
    staging folder beside `out` and renamed into place once finished, so an evaluation that fails
    or is stopped (SIGTERM, Ctrl-C) leaves neither a partial `out` nor its staging folder.
    `progress(label, done, total)` is told of the episodes each run has finished (per batch; per
    run with `workers > 1`)."""
    jobs = {
        (mode_name if len(models) == 1 else f"{model_name}/{mode_name}"): (model_name, mode_name)
        for model_name in models
        for mode_name in modes
    }
    out = Path(out)
    for label in jobs:  # every path a run writes stays inside `out`
        if out.resolve() not in (out / label).resolve().parents:
            raise ValueError(f"run {label!r}: its folder {out / label} is not inside {out}")
    check_output_dir(out, overwrite, tool=TOOL, inputs=inputs)
    tmp = staging_dir(out)
    try:
        metrics = _evaluate(
            models, modes, specs, jobs, tmp, out, sampling, seed, grid_prompts, workers, batch,
            progress,
        )  # fmt: skip
        mark(tmp, TOOL)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def _evaluate(
    models, modes, specs, jobs, tmp: Path, out: Path, sampling, seed, grid_prompts, workers, batch,
    progress=None,
) -> dict:  # fmt: skip
    """`evaluate`'s work, written into `tmp` (image paths in the results named under `out`)."""
    args = {
        label: (models[m], modes[k], specs, tmp / label, sampling, seed, batch, out / label)
        for label, (m, k) in jobs.items()
    }
    for label in args if progress is not None else ():
        progress(label, 0, len(specs))
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        with ProcessPoolExecutor(workers, context, torch.set_num_threads, (1,)) as pool:
            futures = {label: pool.submit(_run, *a) for label, a in args.items()}
            results = {}
            for label, future in futures.items():
                results[label] = future.result()
                if progress is not None:
                    progress(label, len(specs), len(specs))
    else:
        results = {}
        for label, a in args.items():
            told = None if progress is None else partial(progress, label)
            results[label] = _run(*a, progress=told)
    metrics: dict = {
        "runs": {},
        "prompts": len(specs),
        "sampling": vars(sampling),
        "workers": workers,
        "batch": batch,
        "prompt_list": {  # per prompt, so runs of several evaluations can be paired (`avr.research.claims`)
            "prompt": [spec.prompt for spec in specs],
            "tag": [spec.tag for spec in specs],
            "level": [complexity(spec).level for spec in specs],
        },
    }
    for label, (model_name, mode_name) in jobs.items():
        metrics["runs"][label] = {"model": model_name, "mode": mode_name, **results[label]}
        plot_trajectories(tmp / label, grid_prompts)
    metrics["paired"] = compare_runs(metrics["runs"], [spec.tag for spec in specs])
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_accuracy(metrics, tmp)
    (tmp / "report.md").write_text(report(metrics), encoding="utf-8")
    return metrics


@dataclass(frozen=True)
class BestOf:
    """A compute-matched baseline: `mode` sampled `n` times per prompt, the **verifier** picking
    the first sample it accepts (else the first sample). The verifier is the judge of the
    benchmark itself, so this is an oracle selection: an upper bound on what `n` independent
    samples buy, against which a mode that reflects with the model's own verdict is compared at
    equal compute. Its compute counts all `n` samples. On the command line: `--modes 'direct*4'`."""

    mode: Mode
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"best-of needs n ≥ 1, got {self.n}")


def _run(
    model,
    mode,
    specs,
    folder: Path,
    sampling: SamplingConfig,
    seed: int,
    batch: int = 32,
    report_as: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """One (model, mode): rollouts in GenEval's layout plus `trajectories.jsonl`, then scores
    (image paths named under `report_as`, the folder `folder` will become, where given).
    Prompt `i` is rolled out with seed `seed + i`, a `BestOf`'s further samples as
    `avr.rollout.rollout_seed` says, `batch` episodes at a time."""
    model.eval()
    verifier = Verifier()
    trajectories, cost = _roll_out(model, mode, specs, sampling, seed, batch, progress, verifier)
    measures = _Measures(verifier)
    side = model.config.image_size
    records = []
    for i, (spec, trajectory) in enumerate(zip(specs, trajectories, strict=True)):
        final = trajectory.final_image  # a rollout that drew nothing is judged on a blank canvas
        final = final if final is not None else Image.new("RGB", (side, side), "white")
        write_prompt(folder, i, spec, [final])
        measures.update(spec, trajectory, final)
        trajectory.meta.setdefault("prompt", spec.prompt)
        records.append(trajectory_to_record(trajectory, f"{i:05d}", folder / "trajectories"))
    with open(folder / "trajectories" / "trajectories.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    scored = score_folder(folder, report_as=report_as)  # one record per prompt, in order
    summary = summarize(scored)
    correct = [int(r["correct"]) for r in scored]
    tags = [r["tag"] for r in scored]
    return {
        "overall": summary.overall,
        "interval": {
            "overall": overall_interval(correct, tags),
            "by_tag": {t: wilson(round(a * n), n) for t, (a, _, n) in summary.by_tag.items()},
            "by_level": {lv: wilson(round(a * n), n) for lv, (a, _, n) in summary.by_level.items()},
        },
        "correct": correct,
        "overall_partial": summary.overall_partial,
        "by_tag": {t: a for t, (a, _, _) in summary.by_tag.items()},
        "by_level": {lv: a for lv, (a, _, _) in summary.by_level.items()},
        "per_prompt": {k: v / len(specs) for k, v in cost.items()},
        **measures.summary(),
    }


def _roll_out(
    model, mode, specs, sampling, seed, batch, progress, verifier
) -> tuple[list[Trajectory], dict[str, float]]:
    """One trajectory per prompt (a `BestOf`'s first sample the verifier accepts, else its first)
    and the compute of every sample drawn: NFE, text tokens, seconds."""
    inner, n = (mode.mode, mode.n) if isinstance(mode, BestOf) else (mode, 1)
    jobs = [
        Job(inner, spec, rollout_seed(seed, i, k)) for i, spec in enumerate(specs) for k in range(n)
    ]
    start = time.perf_counter()
    samples = []
    for first in range(0, len(jobs), batch):  # as `rollout` batches them, telling `progress`
        samples += rollout(model, jobs[first : first + batch], sampling, batch)
        if progress is not None:
            progress(min(len(jobs), first + batch) // n, len(specs))
    cost = {"nfe": 0.0, "text_tokens": 0.0, "seconds": time.perf_counter() - start}
    trajectories = []
    for i, spec in enumerate(specs):
        candidates = samples[i * n : (i + 1) * n]
        for trajectory in candidates:  # the compute of every sample counts
            cost["nfe"] += trajectory.meta.get("nfe", 0)
            cost["text_tokens"] += trajectory.meta.get("text_tokens", 0)
        accepted = [
            t
            for t in candidates
            if t.final_image is not None and verifier.verify(t.final_image, spec).correct
        ]
        trajectories.append((accepted or candidates)[0])
    return trajectories, cost


class _Measures:
    """Everything an evaluation measures beside accuracy, one trajectory at a time: the modes
    chosen per level, fidelity (all, seen, held-out), whether later images build on earlier ones,
    outcomes per problem, and how the model reads its own work."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.chosen: dict[str, dict[str, int]] = {level: {} for level in LEVELS}
        self.fidelity = {"all": Fidelity(), "seen": Fidelity(), "heldout": Fidelity()}
        self.builds_on, self.outcomes = BuildsOn(), Outcomes()
        self.understanding = Understanding(verifier)

    def update(self, spec, trajectory: Trajectory, final: Image.Image) -> None:
        level, picked = complexity(spec).level, trajectory.meta["mode"]
        self.chosen[level][picked] = self.chosen[level].get(picked, 0) + 1
        verdict = self.verifier.verify(final, spec)
        for key in ("all", "heldout" if is_held_out(spec) else "seen"):
            self.fidelity[key].update(verdict, spec)
        self.outcomes.update(verdict, spec, level)
        drawn = [s.image for s in trajectory.images if s.role.generated]
        if len(drawn) >= 2:
            verdicts = [self.verifier.verify(image, spec) for image in drawn[:-1]]
            last = drawn[-1]  # the final image as a rule, judged above
            same = last is final
            verdicts.append(verdict if same else self.verifier.verify(last, spec))
            self.builds_on.update(verdicts)
        self.understanding.update(trajectory, spec)

    def summary(self) -> dict:
        return {
            "chosen_mode_by_level": {lv: c for lv, c in self.chosen.items() if c},
            "fidelity": {key: f.summary() for key, f in self.fidelity.items() if f.images},
            "builds_on": self.builds_on.summary(),
            "outcomes": self.outcomes.summary(),
            "understanding": self.understanding.summary(),
        }


def parse_mode(name: str) -> Mode | BestOf:
    """A registered mode by name, or `NAME*N`: that mode as a best-of-N baseline (`BestOf`)."""
    base, star, count = name.partition("*")
    if not star:
        return MODES.get(name)()
    if not count.isdigit() or int(count) < 2:
        raise ValueError(f"--modes {name!r}: best-of needs NAME*N with an integer N ≥ 2")
    return BestOf(MODES.get(base)(), int(count))


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    """The ODE sampler with greedy text that every run uses; a value `SamplingConfig` refuses is an
    error naming the command-line flag (`--shift`), not the config field (`sampling.shift`)."""
    try:
        return SamplingConfig(
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            shift=args.shift,
            temperature=0.0,
            max_text_tokens=args.max_text_tokens,
        )
    except ValueError as err:
        field_name, _, rest = str(err).removeprefix("sampling.").partition(":")
        raise ValueError(f"--{field_name.replace('_', '-')}:{rest}") from None


#: What a model's name may be: it names a folder of the report (`OUT/<name>/<mode>`).
_LABEL = re.compile(r"[A-Za-z0-9._-]+")


def _load_models(entries: list[str]) -> dict[str, UnifiedModel]:
    """`DIR` or `NAME=DIR` entries → models by name (a bare `DIR` is named by its folder)."""
    models = {}
    for entry in entries:
        name, _, path = entry.rpartition("=")
        name = name or Path(path).resolve().name
        if not _LABEL.fullmatch(name) or set(name) == {"."}:
            raise ValueError(
                f"--model {entry}: the name {name!r} must be a plain folder name (letters, digits, "
                "'.', '_', '-'): each run's outputs go to OUT/<name>/<mode>"
            )
        if name in models:
            raise ValueError(f"--model {entry}: the name {name!r} is given twice")
        models[name] = from_pretrained(path)
    return models


def main(argv: list[str] | None = None) -> int:
    """Evaluate; bad input prints `error: …` and returns 2."""
    args = parser().parse_args(argv)
    exit_cleanly_on_sigterm()  # a stopped evaluation removes its staging folder
    try:
        specs, modes, models, sampling, inputs = _read_request(args)
    except (ValueError, LookupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks: dict[str, int] = {}
    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=args.quiet) as bar:

        def told(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        metrics = evaluate(
            models,
            specs,
            modes,
            Path(args.output),
            sampling,
            args.seed,
            workers=args.workers,
            batch=args.batch,
            overwrite=args.overwrite,
            inputs=inputs,
            progress=told,
        )
    table = Table(title=f"{args.output}: {len(specs)} prompts")
    for column in ("run", "overall", *LEVELS, "NFE/prompt", "tokens/prompt", "s/prompt"):
        table.add_column(column, justify="right")
    for name, m in metrics["runs"].items():
        table.add_row(
            name,
            percent(m["overall"]),
            *(percent(m["by_level"].get(lv)) for lv in LEVELS),
            f"{m['per_prompt']['nfe']:.0f}",
            f"{m['per_prompt']['text_tokens']:.0f}",
            f"{m['per_prompt']['seconds']:.2f}",
        )
    Console().print(table)
    print(f"report: {args.output}/report.md")
    return 0


def parser() -> argparse.ArgumentParser:
    """`avr evaluate`'s parser."""
    parser = argparse.ArgumentParser(
        prog="avr evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="exported model folder; repeat as NAME=DIR to compare models in one report",
    )
    parser.add_argument("--prompts", required=True, help="prompt JSONL (GenEval metadata format)")
    parser.add_argument(
        "--modes",
        default="direct,reflect,plan,adaptive",
        help="registered modes, comma-separated; NAME*N: best-of-N baseline picked by the "
        "verifier (quote it: 'direct*4')",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="denoising steps per image (default 10: every documented result uses 10)",
    )
    parser.add_argument(
        "--cfg-scale", type=float, default=1.0, help="classifier-free guidance weight (1: none)"
    )
    parser.add_argument(
        "--shift",
        type=float,
        default=1.0,
        help="timestep schedule shift of the sampler (> 1: more of the steps at high noise)",
    )
    parser.add_argument(
        "--max-text-tokens", type=int, default=96, help="longest text one step may write"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt i is rolled out with seed + i")
    parser.add_argument(
        "--workers", type=int, default=1, help="(model, mode) runs at once, one thread each"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=32,
        help="episodes rolled out together (avr.rollout; 1: one at a time, same results)",
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (must be empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier evaluation at --output (once this one has finished)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _read_request(args: argparse.Namespace) -> tuple:
    """The prompts, modes, models and sampler the flags name, and the inputs the output records;
    the output folder checked. Any bad one is a `ValueError` (or `OSError`) naming it."""
    specs = load_specs(args.prompts)
    if not specs:
        raise ValueError(f"{args.prompts}: holds no prompts")
    for i, spec in enumerate(specs):
        check_spec_vocabulary(spec, f"{args.prompts}:{i + 1}")
    if args.batch < 1:
        raise ValueError(f"--batch: expected ≥ 1, got {args.batch}")
    sampling = _sampling(args)
    modes = {m.strip(): parse_mode(m.strip()) for m in args.modes.split(",") if m.strip()}
    if not modes:
        raise ValueError(f"--modes {args.modes!r}: names no mode")
    models = _load_models(args.model)
    inputs = [args.prompts, *(m.rpartition("=")[2] for m in args.model)]
    check_output_dir(args.output, args.overwrite, tool=TOOL, inputs=inputs)
    return specs, modes, models, sampling, inputs


if __name__ == "__main__":
    sys.exit(main())
