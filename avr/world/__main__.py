"""`python -m avr.world {prompts,render,score}`: write prompt sets, draw ground truth, score folders.

```
python -m avr.world prompts --n 400 --tags counting,position --seed 0 -o prompts.jsonl
python -m avr.world render prompts.jsonl -o runs/gt --per-prompt 2
python -m avr.world score runs/gt
```
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from avr.outputs import fresh_output_dir
from avr.world.complexity import LEVELS, complexity
from avr.world.geneval import MIN_SIDE, score_folder, summarize, write_prompt
from avr.world.prompts import TAGS, sample_scene, sample_specs
from avr.world.render import render
from avr.world.spec import SpecError, VocabularyError, check_spec_vocabulary, iter_specs, save_specs
from avr.world.split import SPLITS


def at_least(low: int):
    """An argparse type: an integer ≥ `low` (anything else: argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input prints `error: …` naming the file and line, and returns 2."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        args.run(args, console)
    except (SpecError, VocabularyError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)  # unwrapped: paths stay whole
        return 2
    return 0


def _prompts(args, console: Console) -> None:
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    specs = sample_specs(args.n, tags, args.seed, args.split)
    if args.output == "-":  # the lines alone on stdout, for a pipe
        sys.stdout.writelines(spec.to_line() + "\n" for spec in specs)
        return
    save_specs(specs, args.output)
    counts = Counter((s.tag, complexity(s).level) for s in specs)
    table = Table(title=f"{len(specs)} prompts → {args.output}")
    table.add_column("tag")
    table.add_column("level")
    table.add_column("prompts", justify="right")
    for (tag, level), n in sorted(counts.items(), key=lambda kv: TAGS.index(kv[0][0])):
        table.add_row(tag, level, str(n))
    console.print(table)


def _render(args, console: Console) -> None:
    entries = list(iter_specs(args.prompts))
    if not entries:
        raise ValueError(f"{args.prompts}: holds no prompts")
    for where, spec in entries:
        check_spec_vocabulary(spec, where)
    fresh_output_dir(args.output, args.overwrite, tool="avr world render", inputs=[args.prompts])
    with Progress(console=Console(stderr=True), transient=True) as bar:
        for index, (_, spec) in enumerate(bar.track(entries, description="render")):
            images = [
                render(
                    sample_scene(spec, np.random.default_rng([args.seed, index, k])),
                    args.resolution,
                )
                for k in range(args.per_prompt)
            ]
            write_prompt(args.output, index, spec, images)
    console.print(
        f"wrote {len(entries)} prompts × {args.per_prompt} ground-truth renders "
        f"({args.resolution} px) to {args.output}"
    )


def _score(args, console: Console) -> None:
    records = score_folder(args.folder, allow_missing=args.allow_missing)
    summary = summarize(records)
    table = Table(title=f"ShapeWorld verifier: {args.folder} ({summary.images} images)")
    table.add_column("group")
    table.add_column("accuracy", justify="right")
    table.add_column("partial", justify="right")
    table.add_column("images", justify="right")
    ordered_tags = sorted(
        summary.by_tag, key=lambda t: (TAGS.index(t) if t in TAGS else len(TAGS), t)
    )
    for tag in ordered_tags:
        acc, partial, n = summary.by_tag[tag]
        table.add_row(tag, f"{acc:.1%}", f"{partial:.3f}", str(n))
    table.add_section()
    for level in LEVELS:
        if level in summary.by_level:
            acc, partial, n = summary.by_level[level]
            table.add_row(f"level: {level}", f"{acc:.1%}", f"{partial:.3f}", str(n))
    table.add_section()
    table.add_row(
        "overall (mean over tags)",
        f"{summary.overall:.1%}",
        f"{summary.overall_partial:.3f}",
        str(summary.images),
        style="bold",
    )
    console.print(table)
    missing = [r for r in records if r.get("missing")]
    if missing:
        console.print(f"{len(missing)} missing or unreadable images counted as failures:")
        for record in missing:
            console.print(f"  {record['reason']}", highlight=False)
    console.print(f"results: {args.folder}/results.jsonl")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avr world",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    sub = parser.add_subparsers(required=True, metavar="{prompts,render,score}")

    p = sub.add_parser(
        "prompts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="write a GenEval-format prompt set",
    )
    p.add_argument("--n", type=at_least(1), required=True, help="number of prompts")
    p.add_argument(
        "--tags", default=",".join(TAGS), help=f"comma-separated, from {', '.join(TAGS)}"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts drawn")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="heldout: only prompts with a combination training data never has (avr.world.split)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="JSONL file to write (-: the lines on stdout)"
    )
    p.set_defaults(run=_prompts)

    r = sub.add_parser(
        "render",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="ground-truth renders in GenEval's output layout",
    )
    r.add_argument("prompts", help="prompt JSONL (GenEval metadata format)")
    r.add_argument(
        "-o", "--output", required=True, help="empty folder: OUT/00000/samples/0000.png, …"
    )
    r.add_argument("--overwrite", action="store_true", help="empty a non-empty output folder first")
    r.add_argument("--per-prompt", type=at_least(1), default=1, help="images per prompt")
    r.add_argument(
        "--resolution",
        type=at_least(MIN_SIDE),
        default=64,
        help=f"image side in px (score reads ≥ {MIN_SIDE})",
    )
    r.add_argument("--seed", type=int, default=0, help="seed of the scene layouts")
    r.set_defaults(run=_render)

    s = sub.add_parser(
        "score",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="score every image of a GenEval-layout folder",
    )
    s.add_argument("folder", help="a folder in GenEval's layout (avr world render, avr evaluate)")
    s.add_argument(
        "--allow-missing",
        action="store_true",
        help="count a prompt without images, or an unreadable image, as a failed image "
        "(reported) instead of stopping",
    )
    s.set_defaults(run=_score)
    return parser


if __name__ == "__main__":
    sys.exit(main())
