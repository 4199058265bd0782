"""`avr generate "a red circle left of a blue square" --mode adaptive -o out.png`.

Makes images with a trained model through `avr.Pipeline`, prints each trajectory's text (mode,
plan steps, critiques), its compute and, where the prompt parses, the verifier's verdict on the
final image; `--show-trajectory` also writes the strip of every intermediate image with its text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from avr.sequence import TrajectoryError

#: The model `avr generate` and `avr.Pipeline` users start from.
DEFAULT_MODEL = "shapeworld-tiny-self"


def output_paths(out: str, prompts: int, per_prompt: int) -> list[Path]:
    """`out` itself for one image; `stem_<prompt>_<image><suffix>` beside it for several."""
    path = Path(out)
    if prompts * per_prompt == 1:
        return [path]
    return [
        path.with_name(f"{path.stem}_{i}_{k}{path.suffix}")
        for i in range(prompts)
        for k in range(per_prompt)
    ]


def main(argv: list[str] | None = None) -> int:
    """Generate; bad input prints `error: …` and returns 2."""
    args = parser().parse_args(argv)
    from avr.pipeline import Pipeline

    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images: expected ≥ 1, got {args.num_images}")
        if Path(args.output).suffix.lower() != ".png":
            raise ValueError(f"-o {args.output}: expected a .png file name")
        paths = output_paths(args.output, len(args.prompt), args.num_images)
        taken = [p for p in paths if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]}: exists; choose another -o (nothing is replaced)")
        pipe = Pipeline.from_pretrained(args.model)
        out = pipe(
            args.prompt,
            mode=args.mode,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg_scale,
            seed=args.seed,
            num_images_per_prompt=args.num_images,
            temperature=args.temperature,
        )
    except (ValueError, LookupError, OSError, TrajectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write_and_show(out, paths, args.show_trajectory)
    return 0


def parser() -> argparse.ArgumentParser:
    """`avr generate`'s parser."""
    parser = argparse.ArgumentParser(
        prog="avr generate",
        description="Make images with a trained model, every plan, critique and image shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or shipped model name")
    model_default = "; None: the model's generation_config.json, else {}"
    parser.add_argument(
        "--mode", help="registered mode (avr registry)" + model_default.format("adaptive")
    )
    parser.add_argument(
        "--steps", type=int, help="denoising steps per image" + model_default.format(10)
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        help="classifier-free guidance (1: none)" + model_default.format(1),
    )
    parser.add_argument(
        "--temperature", type=float, help="text sampling (0: greedy)" + model_default.format(0)
    )
    parser.add_argument("--seed", type=int, default=0, help="image j (prompt-major) uses seed + j")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="PNG to write; several images are written as STEM_<prompt>_<image>.png beside it",
    )
    parser.add_argument(
        "--show-trajectory",
        action="store_true",
        help="also write STEM.trajectory.png: every image of the trajectory with its text",
    )
    return parser


def _write_and_show(out, paths: list[Path], show_trajectory: bool) -> None:
    """Write each image to its path and print its trajectory's text, compute and verdict (and
    with `show_trajectory`, write the strip of its images beside it)."""
    from avr.pipeline import trajectory_strip

    console = Console(stderr=False)
    verdicts = out.verify()
    for j, (path, trajectory) in enumerate(zip(paths, out.trajectories, strict=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        out.images[j].save(path)
        verdict = verdicts[j]
        judged = (
            "the verifier cannot judge this prompt (the ShapeWorld grammar does not read it)"
            if verdict is None
            else "right"
            if verdict.correct
            else f"wrong: {verdict.reason}"
        )
        console.print(f"[bold]{escape(out.prompts[j])}[/bold] → {path}")
        for segment in trajectory.segments[1:]:
            shown = f"[{segment.role.value} image]" if segment.is_image else segment.text
            console.print("  " + escape(shown.replace("<|eos|>", "")))
        console.print(f"  {out.nfe[j]} velocity evaluations, {out.text_tokens[j]} text tokens")
        console.print(f"  verifier: {escape(judged)}")
        if show_trajectory:
            strip = path.with_name(f"{path.stem}.trajectory.png")
            trajectory_strip(trajectory, verdict).savefig(strip, dpi=120)
            console.print(f"  trajectory: {strip}")


if __name__ == "__main__":
    sys.exit(main())
