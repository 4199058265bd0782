"""`python -m avr.evaluate --model DIR --prompts FILE --modes direct,reflect,plan,adaptive -o OUT`.

Rolls every prompt out with every mode (ODE sampling), and writes per mode, in GenEval's output
layout, `OUT/<mode>/<00000>/samples/0000.png` (the final image) with its `metadata.jsonl`, so the
official GenEval scorer can judge a real backbone's images; then scores them with the ShapeWorld
verifier and writes `OUT/metrics.json` and `OUT/report.md`: accuracy per tag (overall = mean over
tags, as GenEval computes it), per complexity level and per mode, with the compute each mode spent
per prompt (velocity evaluations, text tokens written, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from avr.backbone import from_pretrained
from avr.policy import PolicyActor, SamplingConfig
from avr.registry import MODES
from avr.world import LEVELS, TAGS, complexity, load_specs
from avr.world.geneval import score_folder, summarize, write_prompt
from avr.world.verify import check_spec_vocabulary


def evaluate(
    model, specs, modes: list[str], out: Path, sampling: SamplingConfig, seed: int = 0
) -> dict:
    """Roll out, write images, score; returns the metrics (also written to `out/metrics.json`)."""
    metrics: dict = {"modes": {}, "prompts": len(specs), "sampling": vars(sampling)}
    model.eval()
    for name in modes:
        mode = MODES.get(name)()
        cost = {"nfe": 0.0, "text_tokens": 0.0, "seconds": 0.0}
        chosen: dict[str, dict[str, int]] = {level: {} for level in LEVELS}
        for i, spec in enumerate(specs):
            start = time.perf_counter()
            with torch.no_grad():
                trajectory = mode.rollout(
                    PolicyActor(model, sampling, torch.Generator().manual_seed(seed + i)), spec
                )
            cost["seconds"] += time.perf_counter() - start
            cost["nfe"] += trajectory.meta.get("nfe", 0)
            cost["text_tokens"] += trajectory.meta.get("text_tokens", 0)
            level = complexity(spec).level
            chosen[level][trajectory.meta["mode"]] = (
                chosen[level].get(trajectory.meta["mode"], 0) + 1
            )
            final = (
                trajectory.final_image
            )  # a rollout that drew nothing is judged on a blank canvas
            side = model.config.image_size
            write_prompt(
                out / name,
                i,
                spec,
                [final if final is not None else Image.new("RGB", (side, side), "white")],
            )
        summary = summarize(score_folder(out / name))
        metrics["modes"][name] = {
            "overall": summary.overall,
            "overall_partial": summary.overall_partial,
            "by_tag": {t: a for t, (a, _, _) in summary.by_tag.items()},
            "by_level": {lv: a for lv, (a, _, _) in summary.by_level.items()},
            "per_prompt": {k: v / len(specs) for k, v in cost.items()},
            "chosen_mode_by_level": {lv: c for lv, c in chosen.items() if c},
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report(metrics), encoding="utf-8")
    return metrics


def report(metrics: dict) -> str:
    """Markdown tables: accuracy by tag, level and mode, and compute per prompt."""
    modes = list(metrics["modes"])
    tags = [t for t in TAGS if any(t in m["by_tag"] for m in metrics["modes"].values())]
    lines = [
        f"# ShapeWorld evaluation ({metrics['prompts']} prompts)",
        "",
        "| group | " + " | ".join(modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for tag in tags:
        lines.append(
            f"| {tag} | "
            + " | ".join(_pct(metrics["modes"][m]["by_tag"].get(tag)) for m in modes)
            + " |"
        )
    for level in LEVELS:
        lines.append(
            f"| level: {level} | "
            + " | ".join(_pct(metrics["modes"][m]["by_level"].get(level)) for m in modes)
            + " |"
        )
    lines.append(
        "| **overall (mean over tags)** | "
        + " | ".join(_pct(metrics["modes"][m]["overall"]) for m in modes)
        + " |"
    )
    lines += [
        "",
        "| compute per prompt | " + " | ".join(modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for key in ("nfe", "text_tokens", "seconds"):
        lines.append(
            f"| {key} | "
            + " | ".join(f"{metrics['modes'][m]['per_prompt'][key]:.1f}" for m in modes)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    """Evaluate; bad input prints `error: …` and returns 2."""
    parser = argparse.ArgumentParser(
        prog="python -m avr.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--prompts", required=True, help="prompt JSONL (GenEval metadata format)")
    parser.add_argument("--modes", default="direct,reflect,plan,adaptive")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--max-text-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    try:
        specs = load_specs(args.prompts)
        for i, spec in enumerate(specs):
            check_spec_vocabulary(spec, f"{args.prompts}:{i + 1}")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for name in modes:
            MODES.get(name)
        model = from_pretrained(args.model)
    except (ValueError, LookupError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sampling = SamplingConfig(
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        temperature=0.0,
        max_text_tokens=args.max_text_tokens,
    )
    metrics = evaluate(model, specs, modes, Path(args.output), sampling, args.seed)
    table = Table(title=f"{args.output}: {len(specs)} prompts")
    for column in ("mode", "overall", *LEVELS, "NFE/prompt", "tokens/prompt", "s/prompt"):
        table.add_column(column, justify="right")
    for name, m in metrics["modes"].items():
        table.add_row(
            name,
            _pct(m["overall"]),
            *(_pct(m["by_level"].get(lv)) for lv in LEVELS),
            f"{m['per_prompt']['nfe']:.0f}",
            f"{m['per_prompt']['text_tokens']:.0f}",
            f"{m['per_prompt']['seconds']:.2f}",
        )
    Console().print(table)
    print(f"report: {args.output}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
