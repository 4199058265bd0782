"""`python -m avr.data build --n N --mix simple=0.3,medium=0.4,complex=0.3 --seed S -o DIR`.

`--from-model DIR` builds from the model's own samples: the model draws every image, the teacher
judges and corrects (`avr.data.self_sample`). `python -m avr.data merge A B -o DIR` makes one data
folder of several builds (a round's own samples beside the earlier rounds')."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from avr.backbone import from_pretrained
from avr.data.build import FromModel, build, parse_mix
from avr.data.labels import ModeLabeler
from avr.data.merge import merge
from avr.outputs import exit_cleanly_on_sigterm


def main(argv: list[str] | None = None) -> int:
    """Build a data set and print its counts; bad arguments print `error: …` and return 2."""
    args = parser().parse_args(argv)
    exit_cleanly_on_sigterm()
    try:
        if "sources" in args:
            merged = merge(args.sources, args.output, args.overwrite)
            Console().print(
                f"{merged['n']} trajectories from {len(args.sources)} folders → {args.output}"
            )
            return 0
        manifest = _build(args)
    except (ValueError, LookupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_counts(manifest, args.output)
    return 0


def parser() -> argparse.ArgumentParser:
    """`avr data`'s parser: the `build` and `merge` subcommands."""
    parser = argparse.ArgumentParser(
        prog="avr data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    sub = parser.add_subparsers(required=True, metavar="{build,merge}")
    _add_build(sub)
    m = sub.add_parser(
        "merge",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="one data folder from several builds",
    )
    m.add_argument("sources", nargs="+", metavar="DIR", help="data folders, in order")
    m.add_argument("-o", "--output", required=True, help="the new folder (must not exist)")
    m.add_argument(
        "--overwrite", action="store_true", help="replace an earlier data folder at --output"
    )
    return parser


def _add_build(sub) -> None:
    """The `build` subcommand and its flags."""
    b = sub.add_parser(
        "build",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="write teacher trajectories as sharded JSONL + PNG",
    )
    b.add_argument("--n", type=int, required=True, help="number of trajectories")
    b.add_argument(
        "--mix", default="simple=0.3,medium=0.4,complex=0.3", help="share of each complexity level"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of prompts, scenes and samples")
    b.add_argument(
        "--split",
        choices=("train", "all"),
        default="train",
        help="train: no prompt with a combination reserved for evaluation (avr.world.split)",
    )
    b.add_argument(
        "--mode",
        default="adaptive",
        help="registered mode that builds every trajectory, or a mixture: adaptive=0.5,reflect=0.5",
    )
    b.add_argument("--shard-size", type=int, default=500, help="trajectories per shard file")
    b.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    b.add_argument(
        "--sketch-error-rate", type=float, default=0.2, help="plan sketches drawn with an error"
    )
    b.add_argument(
        "--describe-critiques",
        action="store_true",
        help="every critique opens with <des>what the verifier sees on the canvas</des>",
    )
    b.add_argument(
        "--label-model",
        metavar="DIR",
        help="label adaptive trajectories with the cheapest mode that succeeds for this model",
    )
    b.add_argument("--label-samples", type=int, default=2, help="rollouts per prompt and mode")
    b.add_argument(
        "--label-threshold", type=float, default=0.5, help="success rate a mode must reach"
    )
    b.add_argument("--label-steps", type=int, default=10, help="ODE steps per labelling image")
    _add_from_model(b)
    b.add_argument("-o", "--output", required=True, help="the new data folder")
    b.add_argument(
        "--overwrite", action="store_true", help="replace an earlier data folder at --output"
    )


def _build(args: argparse.Namespace) -> dict:
    """`avr data build`: the model (and labeler) its flags name, then `build` under a progress bar."""
    own = None
    if args.from_model:
        own = FromModel(
            from_pretrained(args.from_model).eval(),
            args.from_model,
            balance=args.balance or None,
            batch=args.batch,
            own_refines=args.own_refines,
            views=args.critique_views,
            tries=args.tries,
            drop_unsolved=args.drop_unsolved,
        )
    else:
        given = [
            flag
            for flag, used in (
                ("--critique-views", args.critique_views),
                ("--tries", args.tries != 1),
                ("--drop-unsolved", args.drop_unsolved),
            )
            if used
        ]
        if given:
            raise ValueError(f"{given[0]} needs --from-model (it acts on the model's own images)")
    labeler, source = None, "complexity"
    if args.label_model:
        labeler = ModeLabeler(
            from_pretrained(args.label_model),
            args.label_samples,
            args.label_threshold,
            args.label_steps,
            args.seed,
        )
        source = f"model {args.label_model} ({args.label_samples} samples, threshold {args.label_threshold})"
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("trajectories", total=args.n)
        manifest = build(
            args.output,
            args.n,
            parse_mix(args.mix),
            args.seed,
            args.mode,
            args.shard_size,
            args.resolution,
            args.sketch_error_rate,
            args.split,
            labeler,
            source,
            describe_critiques=args.describe_critiques,
            own=own,
            overwrite=args.overwrite,
            progress=lambda k: bar.advance(task, k),
        )
    return manifest


def _print_counts(manifest: dict, output: str) -> None:
    """The table of what a build wrote, its adaptive labels and, from a model, its images."""
    table = Table(title=f"{manifest['n']} trajectories → {output} (seed {manifest['seed']})")
    table.add_column("by")
    table.add_column("value")
    table.add_column("trajectories", justify="right")
    for key in ("mode", "level", "tag"):
        for value, count in manifest["counts"][key].items():
            table.add_row(key, value, str(count))
        table.add_section()
    labels = Table(title=f"adaptive labels by level ({manifest['labels']['source']})")
    labels.add_column("level")
    labels.add_column("mode")
    labels.add_column("trajectories", justify="right")
    for level, modes in manifest["labels"]["by_level"].items():
        for mode, count in modes.items():
            labels.add_row(level, mode, str(count))
    console = Console()
    console.print(table)
    console.print(labels)
    own = manifest.get("from_model")
    if own:
        console.print(
            f"the model's images: {own['images_right']} of {own['images_drawn']} right "
            f"({own['accuracy']:.1%}); first critiques kept: {own['first_critiques']['kept']}; "
            f"refine targets: {own['refine_targets']}"
        )


def _add_from_model(b) -> None:
    """`build`'s flags for trajectories drawn by a model (`--from-model` and what it enables)."""
    b.add_argument(
        "--from-model",
        metavar="DIR",
        help="the model draws every image (ODE, 10 steps); the teacher writes text and corrects",
    )
    b.add_argument(
        "--balance",
        type=float,
        default=1.0,
        help="with --from-model: per level, at most this many first critiques of one verdict "
        "(right or wrong image) per one of the other (0: keep every trajectory)",
    )
    b.add_argument(
        "--batch", type=int, default=32, help="with --from-model: episodes rolled out at once"
    )
    b.add_argument(
        "--own-refines",
        type=int,
        default=1,
        help="with --from-model: refines of a reflect trajectory the model draws before the "
        "teacher's edit corrects the image",
    )
    b.add_argument(
        "--critique-views",
        action="store_true",
        help="with --from-model: learn critiques from views (each critique of the model's image "
        "alone, balanced per level, position and verdict; --balance applies to them), not from "
        "whole trajectories",
    )
    b.add_argument(
        "--tries",
        type=int,
        default=1,
        help="with --from-model: answers the model draws for a direct prompt until the verifier "
        "accepts one (rejection sampling on its own successes)",
    )
    b.add_argument(
        "--drop-unsolved",
        action="store_true",
        help="with --from-model: leave out a direct prompt none of whose tries is right (instead "
        "of training the teacher's render)",
    )


if __name__ == "__main__":
    sys.exit(main())
