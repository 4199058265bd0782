"""Training curves of finished runs, from their CSV logs: a plot and the first-vs-last-third test.

    python -m avr.curves runs/rl-seed0 runs/rl-seed1 runs/rl-seed2 -o docs/rl-reward.png

reads each run's `csv/version_*/metrics.csv` (the newest version; a path to a `metrics.csv` works
too), plots `--metric` per step (thin) with its moving average (thick), and prints, per run, the
mean over the first and the last third of the steps and whether the last exceeds the first (a
rising reward); `--modes` adds an RL run's mode usage per prompt level, first third vs last.
Exits 0 whatever the outcome: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Curve:
    """One run's metric per step."""

    run: str
    steps: np.ndarray
    values: np.ndarray

    def thirds(self) -> tuple[float, float]:
        """Means over the first and the last third of the logged steps."""
        third = max(1, len(self.values) // 3)
        return float(self.values[:third].mean()), float(self.values[-third:].mean())


def metrics_file(run: str | Path) -> Path:
    """The run's newest `metrics.csv` (or `run` itself when it is one)."""
    path = Path(run)
    if path.is_file():
        return path
    found = sorted(
        path.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not found:
        raise FileNotFoundError(f"{path}: no csv/version_*/metrics.csv (a CSVLogger's output)")
    return found[-1]


def read_curve(run: str | Path, metric: str) -> Curve:
    """`metric` per step of one run (rows without it are skipped; the last row of a step wins)."""
    path = metrics_file(run)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and metric not in rows[0]:
        columns = ", ".join(sorted(k for k in rows[0] if k.startswith("train/")))
        raise KeyError(f"{path}: no column {metric!r}; it has {columns}")
    per_step: dict[int, float] = {}
    for row in rows:
        value = row.get(metric, "")
        if value not in ("", None) and math.isfinite(float(value)):
            per_step[int(row["step"])] = float(value)
    if not per_step:
        raise ValueError(f"{path}: {metric!r} has no finite value")
    steps = np.array(sorted(per_step))
    return Curve(str(run), steps, np.array([per_step[s] for s in steps]))


def mode_usage(run: str | Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Per level, each mode's share of that level's rollouts over the first and the last third of
    the steps, from RL's `train/mode/<level>/<mode>` counts (`{level: {mode: (first, last)}}`)."""
    path = metrics_file(run)
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/reward")]
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("train/mode/")]
    if not columns:
        raise KeyError(f"{path}: no train/mode/<level>/<mode> columns (an RL run's log)")
    third = max(1, len(rows) // 3)
    usage: dict[str, dict[str, tuple[float, float]]] = {}
    for part, chunk in enumerate((rows[:third], rows[-third:])):
        counts = {c: sum(float(r[c] or 0) for r in chunk) for c in columns}
        for column, count in counts.items():
            level, mode = column.removeprefix("train/mode/").split("/", 1)
            total = sum(v for c, v in counts.items() if c.startswith(f"train/mode/{level}/"))
            share = count / total if total else float("nan")
            first, last = usage.setdefault(level, {}).get(mode, (float("nan"), float("nan")))
            usage[level][mode] = (share, last) if part == 0 else (first, share)
    return usage


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


def plot(curves: list[Curve], metric: str, out: Path, window: int, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, curve in enumerate(curves):
        colour = f"C{i}"
        first, last = curve.thirds()
        ax.plot(curve.steps, curve.values, color=colour, alpha=0.3, linewidth=1)
        label = f"{Path(curve.run).name}: first third {first:.3f} → last third {last:.3f}"
        ax.plot(
            curve.steps,
            moving_average(curve.values, window),
            color=colour,
            linewidth=2,
            label=label,
        )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric, fontsize=10)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, title=f"thin: per step; thick: mean of the last {window} steps")
    legend.get_title().set_fontsize(8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="avr curves",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir) or CSVs")
    parser.add_argument(
        "--metric", default="train/reward/compositional", help="the logged metric to plot"
    )
    parser.add_argument("--window", type=int, default=5, help="moving-average window (steps)")
    parser.add_argument("--title", default=None, help="the plot's title (None: the metric's name)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG to write")
    parser.add_argument(
        "--modes",
        action="store_true",
        help="also print RL's mode usage per level, first vs last third",
    )
    args = parser.parse_args(argv)
    curves = [read_curve(run, args.metric) for run in args.runs]
    for curve in curves:
        first, last = curve.thirds()
        verdict = "rises" if last > first else "does not rise"
        print(
            f"{curve.run}: {len(curve.values)} steps; {args.metric} first third {first:.4f}, "
            f"last third {last:.4f} ({last - first:+.4f}): {verdict}"
        )
        if args.modes:
            for level, modes in mode_usage(curve.run).items():
                shares = ", ".join(
                    f"{mode} {first:.0%} → {last:.0%}" for mode, (first, last) in modes.items()
                )
                print(f"  {level}: {shares}")
    if args.out is not None:
        plot(curves, args.metric, args.out, args.window, args.title)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
