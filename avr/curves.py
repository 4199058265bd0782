"""Training curves of finished runs, from their CSV logs: a plot and the first-vs-last-third test.

    python -m avr.curves runs/rl-seed0 runs/rl-seed1 runs/rl-seed2 -o docs/rl-reward.png

reads each run's `csv/version_*/metrics.csv` (the newest version; a path to a `metrics.csv` works
too), plots `--metric` per step (thin) with its moving average (thick), and prints, per run, the
mean over the first and the last third of the steps and whether the last exceeds the first (the
issue's test of a rising reward). Exits 0 whatever the outcome: it reports, it does not judge.
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
    ax.set_ylabel(f"{metric} (thin: per step; thick: mean of the last {window})")
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m avr.curves", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir) or CSVs")
    parser.add_argument("--metric", default="train/reward/compositional")
    parser.add_argument("--window", type=int, default=5, help="moving-average window (steps)")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG to write")
    args = parser.parse_args(argv)
    curves = [read_curve(run, args.metric) for run in args.runs]
    for curve in curves:
        first, last = curve.thirds()
        verdict = "rises" if last > first else "does not rise"
        print(
            f"{curve.run}: {len(curve.values)} steps; {args.metric} first third {first:.4f}, "
            f"last third {last:.4f} ({last - first:+.4f}): {verdict}"
        )
    if args.out is not None:
        plot(curves, args.metric, args.out, args.window, args.title)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
