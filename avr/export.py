"""`python -m avr.export CKPT -o DIR`: a Lightning checkpoint → the `save_pretrained` format.

The checkpoint is read with `weights_only=True`; with an EMA in it, the EMA weights are exported
unless `--weights raw` asks for the trained ones (early in a run, an EMA of decay 0.999 is still
mostly the initial weights).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from avr.backbone.files import CARDS, GENERATION_CONFIG, WRITTEN
from avr.cards import export_card, write_generation_config
from avr.lit.base import load_checkpoint_backbone
from avr.outputs import check_only_written


def main(argv: list[str] | None = None) -> int:
    """Export; a bad checkpoint prints `error: …` and returns 2."""
    parser = argparse.ArgumentParser(
        prog="avr export",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("checkpoint", help="a .ckpt that avr fit wrote")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="the model folder to write (new, or an earlier export)",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="auto: the EMA when the checkpoint keeps one, else the trained weights",
    )
    args = parser.parse_args(argv)
    try:  # before any work: the output is new, or an earlier model save alone
        check_only_written(args.output, (*WRITTEN, *CARDS), "a model save")
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info: dict = {}
    try:
        model, prefix = load_checkpoint_backbone(args.checkpoint, args.weights, info)
    except (pickle.UnpicklingError, EOFError) as err:
        print(
            f"error: {args.checkpoint}: not a checkpoint that loads without pickle (empty, "
            "truncated, or holding Python objects other than tensors and plain values: "
            f"{type(err).__name__}); avr never runs pickled code",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        print(f"error: {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    try:
        out = model.save_pretrained(args.output)
        weights = "EMA" if prefix.startswith("ema") else "trained"
        if not (out / "README.md").is_file():  # an earlier export's card (or a shipped one) stays
            text = export_card(out.name, Path(args.checkpoint), weights, info["step"], info["data"])
            (out / "README.md").write_text(text, encoding="utf-8")
        if not (out / GENERATION_CONFIG).is_file():
            write_generation_config(out)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} ({prefix.rstrip('.')}) → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
