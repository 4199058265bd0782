"""The report of an evaluation (`avr.evaluate`): `report.md`'s markdown tables (accuracy by tag,
level and run with intervals, paired comparisons, compute per prompt, what decided each final
image, how the model read its own work), the accuracy-against-compute plots and the trajectory
grids, all from `metrics.json` and the runs' folders."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from avr.intervals import paired
from avr.world import LEVELS, TAGS
from avr.world.fidelity import OUTCOMES


def compare_runs(runs: dict, tags: list[str]) -> list[dict]:
    """Paired comparisons on the same prompts (`avr.intervals.paired`): every two modes of one
    model, and every two models on one mode; `b − a` with its interval and McNemar's p."""
    labels = list(runs)
    pairs = [
        (a, b)
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        if runs[a]["model"] == runs[b]["model"] or runs[a]["mode"] == runs[b]["mode"]
    ]
    return [
        {"a": a, "b": b, **paired(runs[a]["correct"], runs[b]["correct"], tags)} for a, b in pairs
    ]


def plot_accuracy(metrics: dict, out: Path) -> None:
    """`out/accuracy_vs_compute.png` (overall accuracy against NFE and text tokens per prompt,
    one point per run) and `out/accuracy_by_level.png` (grouped bars)."""
    runs = metrics["runs"]
    # Figure, not pyplot: no global backend or state (a notebook importing this keeps its own).
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("nfe", "text_tokens"), ("NFE", "text tokens"), strict=True):
        for (x, y), labels in point_labels(runs, key).items():
            low, high = (
                100 * v for v in runs[labels[0]].get("interval", {}).get("overall", (y / 100,) * 2)
            )
            ax.errorbar([x], [y], yerr=[[max(0.0, y - low)], [max(0.0, high - y)]], fmt="o",
                        capsize=3)  # fmt: skip
            ax.annotate(" = ".join(labels), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)  # fmt: skip
        ax.set(xlabel=f"{name} per prompt", ylabel="overall accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"accuracy against compute ({metrics['prompts']} prompts; bars: 95% bootstrap intervals)"
    )
    fig.savefig(out / "accuracy_vs_compute.png", dpi=120)

    fig = Figure(figsize=(max(6, 1.2 * len(runs) + 3), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for k, (label, run) in enumerate(runs.items()):
        values = [100 * (run["by_level"].get(level) or 0.0) for level in LEVELS]
        bounds = run.get("interval", {}).get("by_level", {})
        errors = [
            [
                max(0.0, v - 100 * bounds[lv][0]) if lv in bounds else 0.0
                for v, lv in zip(values, LEVELS, strict=True)
            ],
            [
                max(0.0, 100 * bounds[lv][1] - v) if lv in bounds else 0.0
                for v, lv in zip(values, LEVELS, strict=True)
            ],
        ]
        ax.bar([i + k * width for i in range(len(LEVELS))], values, width, label=label,
               yerr=errors, capsize=2)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(LEVELS))], LEVELS)
    ax.set(
        ylabel="accuracy (%)",
        ylim=(0, 100),
        title="accuracy per complexity level (bars: 95% Wilson intervals)",
    )
    ax.legend(fontsize=8)
    fig.savefig(out / "accuracy_by_level.png", dpi=120)


def point_labels(runs: dict, key: str) -> dict[tuple[float, float], list[str]]:
    """Runs grouped by their point (compute `key` per prompt, overall accuracy in %): runs that
    land on the same point are labelled once, together ("a = b"), instead of overprinting."""
    points: dict[tuple[float, float], list[str]] = {}
    for label, run in runs.items():
        point = (round(run["per_prompt"][key], 6), round(100 * run["overall"], 6))
        points.setdefault(point, []).append(label)
    return points


def plot_trajectories(folder: Path, prompts: int) -> None:
    """`folder/trajectories.png`: the first `prompts` trajectories, one row each: every image in
    order with its role, then the prompt and the verifier's verdict on the final image."""
    lines = (folder / "trajectories" / "trajectories.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in lines.splitlines()[:prompts]]
    verdicts = {Path(r["filename"]).parent.parent.name: r for r in _results(folder)}
    columns = max(1, *(sum(s["type"] == "image" for s in r["segments"]) for r in records))
    fig = Figure(figsize=(1.3 * columns + 4.5, 1.4 * len(records)))
    axes = fig.subplots(
        len(records), columns + 1, squeeze=False, width_ratios=[1] * columns + [3.5]
    )
    for row, record in zip(axes, records, strict=True):
        for ax in row:
            ax.axis("off")
        images = [s for s in record["segments"] if s["type"] == "image"]
        for ax, segment in zip(row, images, strict=False):  # rows are as wide as the longest
            ax.imshow(Image.open(folder / "trajectories" / segment["image"]))
            ax.set_title(segment["role"], fontsize=7, pad=2)
        verdict = verdicts[record["key"]]
        caption = "\n".join(textwrap.wrap(record["meta"]["prompt"], 48))
        status = "correct" if verdict["correct"] else f"wrong: {verdict['reason']}"
        row[-1].text(0, 0.5, f"{caption}\n{textwrap.shorten(status, 60)}", fontsize=7, va="center")
    fig.savefig(folder / "trajectories.png", dpi=110, bbox_inches="tight")


def understanding_table(runs: dict, labels: list[str], rule: str) -> list[str]:
    """Report lines: how each run's model read its own images (critique agreement with the
    verifier, false alarms and misses apart, per level and round), its plan steps against the
    teacher's, and what its refines did. Runs without critiques or plans show dashes."""
    rows: list[tuple[str, list[str]]] = []

    def critique(r: dict) -> dict:
        return r.get("understanding", {}).get("critique", {})

    for name, path in (
        ("critiques judged", ("critiques",)),
        ("agreement with the verifier", ("agreement",)),
        ("balanced accuracy", ("balanced_accuracy",)),
        ("right images called wrong (false alarms)", ("false_alarm_rate",)),
        ("wrong images called right (misses)", ("miss_rate",)),
        *((f"{lv}: agreement", ("by_level", lv, "agreement")) for lv in LEVELS),
        ("first critiques: agreement", ("by_round", "first", "agreement")),
        ("later critiques: agreement", ("by_round", "later", "agreement")),
    ):
        values = []
        for r in runs.values():
            value = critique(r)
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            counted = path == ("critiques",) and value is not None
            values.append(f"{value:.0f}" if counted else percent(value))
        rows.append((name, values))
    for name, group, key in (
        ("plan steps equal to the teacher's", "plan_steps", "accuracy"),
        ("descriptions equal to the verifier's reading", "descriptions", "accuracy"),
        ("descriptions naming the right objects", "descriptions", "object_accuracy"),
        ("refines that fix a wrong image", "refines", "fix_rate"),
        ("refines that break a right image", "refines", "break_rate"),
    ):
        values = [r.get("understanding", {}).get(group, {}).get(key) for r in runs.values()]
        rows.append((name, [percent(v) for v in values]))
    return [
        "",
        "How the model reads its own work (`avr.understanding`: its critiques against the "
        "verifier's judgement of the image they follow, its plan steps against the teacher's):",
        "",
        "| understanding | " + " | ".join(labels) + " |",
        rule,
        *(f"| {name} | " + " | ".join(values) + " |" for name, values in rows),
    ]


def _results(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def report(metrics: dict) -> str:
    """Markdown: accuracy by tag, level and run, compute per prompt, the adaptive policy's
    choices, and the plots and trajectory grids beside it."""
    runs = metrics["runs"]
    labels = list(runs)
    rule = "|---" * (len(labels) + 1) + "|"
    lines = [
        f"# ShapeWorld evaluation ({metrics['prompts']} prompts)",
        "",
        "Accuracy with its 95% interval (Wilson per tag and level; bootstrap over prompts, "
        "stratified by tag, for the overall).",
        "",
        *_accuracy_table(runs, labels, rule),
        *_paired_table(metrics.get("paired") or []),
        *_compute_tables(runs, labels, rule),
        *understanding_table(runs, labels, rule),
        *_outcomes_table(runs, labels, rule),
        "",
        "Modes chosen per complexity level:",
        "",
    ]
    for label, run in runs.items():
        choices = "; ".join(
            f"{lv}: " + ", ".join(f"{m} {n}" for m, n in sorted(c.items()))
            for lv, c in run["chosen_mode_by_level"].items()
        )
        lines.append(f"- {label}: {choices}")
    lines += [
        "",
        "![accuracy against compute](accuracy_vs_compute.png)",
        "![accuracy per level](accuracy_by_level.png)",
        "",
        "Trajectories (first prompts, every image in order): "
        + ", ".join(f"[{label}]({label}/trajectories.png)" for label in labels),
    ]
    return "\n".join(lines) + "\n"


def _accuracy_table(runs: dict, labels: list[str], rule: str) -> list[str]:
    """Accuracy per tag, per level and overall, each with its interval, one column per run."""
    tags = [t for t in TAGS if any(t in r["by_tag"] for r in runs.values())]
    rows = [(tag, [r["by_tag"].get(tag) for r in runs.values()]) for tag in tags]
    rows += [(f"level: {lv}", [r["by_level"].get(lv) for r in runs.values()]) for lv in LEVELS]
    rows.append(("**overall (mean over tags)**", [r["overall"] for r in runs.values()]))
    bounds = [
        [r.get("interval", {}).get("by_tag", {}).get(tag) for r in runs.values()] for tag in tags
    ]
    bounds += [
        [r.get("interval", {}).get("by_level", {}).get(lv) for r in runs.values()] for lv in LEVELS
    ]
    bounds.append([r.get("interval", {}).get("overall") for r in runs.values()])
    return ["| group | " + " | ".join(labels) + " |", rule] + [
        f"| {name} | "
        + " | ".join(_pct_ci(v, b) for v, b in zip(values, bound, strict=True))
        + " |"
        for (name, values), bound in zip(rows, bounds, strict=True)
    ]


def _paired_table(paired: list[dict]) -> list[str]:
    """The paired comparisons (none: no lines)."""
    if not paired:
        return []
    lines = [
        "",
        "Paired comparisons on the same prompts (b − a in overall accuracy, 95% paired "
        "bootstrap interval; McNemar's exact p on the prompts only one run got right):",
        "",
        "| a | b | b − a | 95% interval | only a | only b | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in paired:
        low, high = c["interval"]
        lines.append(
            f"| {c['a']} | {c['b']} | {100 * c['difference']:+.1f} pts | "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] | {c['only_a']} | {c['only_b']} | "
            f"{c['mcnemar_p']:.3f} |"
        )
    return lines


def _compute_tables(runs: dict, labels: list[str], rule: str) -> list[str]:
    """Compute per prompt, prompt use of the final images, and how often images build on the
    one before."""
    lines = ["", "| compute per prompt | " + " | ".join(labels) + " |", rule]
    for key in ("nfe", "text_tokens", "seconds"):
        values = [f"{r['per_prompt'][key]:.1f}" for r in runs.values()]
        lines.append(f"| {key} | " + " | ".join(values) + " |")
    lines += ["", "| prompt use (final images) | " + " | ".join(labels) + " |", rule]
    for group in ("all", "seen", "heldout"):
        for key in ("accuracy", "exact", "colour_precision", "shape_precision"):
            values = [r.get("fidelity", {}).get(group, {}).get(key) for r in runs.values()]
            lines.append(f"| {group}: {key} | " + " | ".join(percent(v) for v in values) + " |")
        for key in ("objects_per_image", "asked_per_image"):
            values = [r.get("fidelity", {}).get(group, {}).get(key) for r in runs.values()]
            lines.append(f"| {group}: {key} | " + " | ".join(_num(v) for v in values) + " |")
    values = []
    for r in runs.values():
        b = r.get("builds_on") or {}
        values.append(
            f"{percent(b.get('rate'))} of {b.get('steps', 0):.0f}" if b.get("steps") else "–"
        )
    lines.append(
        "| images that keep what the one before had right (refine on draft, sketch on sketch) | "
        + " | ".join(values)
        + " |"
    )
    return lines


def _outcomes_table(runs: dict, labels: list[str], rule: str) -> list[str]:
    """What decided each final image, per level (no lines where no run has outcomes)."""
    levels = [lv for lv in LEVELS if any(lv in r.get("outcomes", {}) for r in runs.values())]
    if not levels:
        return []
    lines = [
        "",
        "What decided each final image (share of the level's images; a wrong image counts "
        "under the first of blank, too few objects, wrong shape, colour, count, relation):",
        "",
        "| outcome | " + " | ".join(labels) + " |",
        rule,
    ]
    for level in levels:
        for key in OUTCOMES:
            values = [r.get("outcomes", {}).get(level, {}).get(key) for r in runs.values()]
            lines.append(f"| {level}: {key} | " + " | ".join(percent(v) for v in values) + " |")
    return lines


def _pct_ci(value, bound) -> str:
    if value is None or bound is None or any(b != b for b in bound):  # NaN: no prompts
        return percent(value)
    return f"{percent(value)} [{100 * bound[0]:.0f}–{100 * bound[1]:.0f}]"


def percent(value) -> str:
    """`value` (0–1) as a percentage with one decimal; "–" for none."""
    return "–" if value is None or value != value else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"
