"""Can the critic learn to read? Critique views of teacher renders (docs/self-improvement.md,
"Reading renders").

`build` writes a data folder of first-critique views, balanced per level (simple, medium) and
verdict: the prompt and `<mode:reflect>` (read), a render of a scene that satisfies the prompt or
of that scene with one planted error (read), and the verifier's critique of the image (trained).
With `--degrade P`, a share P of the images is made to look drawn (a smooth random warp of
0.5-2.5 px, a blur, sometimes white streaks or small coloured fragments) before the verifier
judges it, so every label is the verifier's reading of the pixels the model sees. `judge` scores a
model's greedy critique of such a folder's views: right images accepted, wrong ones caught.

    python experiments/probes/render_views.py build runs/render-views --n 64000 --seed 71
    python experiments/probes/render_views.py build runs/render-test --n 1000 --seed 7 --split heldout
    python experiments/probes/render_views.py judge checkpoints/shapeworld-tiny-self runs/render-test
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

from avr.backbone import from_pretrained
from avr.data.build import content_id, write_shard
from avr.data.critique import OK_IMAGE, critique_text, is_verdict_ok
from avr.data.teacher import ShapeWorldTeacher
from avr.sequence import FORMAT_VERSION, ImageRole, Segment, Trajectory, trajectory_to_record
from avr.world import Verifier, complexity, render, sample_scene, sample_specs

LEVELS = ("simple", "medium")


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` made to look drawn: corners round and edges wobble, a blur, sometimes streaks or
    fragments."""
    a = np.asarray(image, np.float64) / 255
    side = a.shape[0]
    amplitude, smooth = rng.uniform(0.5, 2.5), rng.uniform(1.5, 4)
    fields = []
    for _ in range(2):
        field = gaussian_filter(rng.normal(size=(side, side)), smooth)
        fields.append(field * amplitude / (np.abs(field).max() + 1e-8))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    where = [yy + fields[0], xx + fields[1]]
    a = np.stack([map_coordinates(a[..., c], where, order=1, mode="nearest") for c in range(3)], -1)
    sigma = rng.uniform(0.0, 0.9)
    if sigma > 0.1:
        a = gaussian_filter(a, (sigma, sigma, 0))
    if rng.random() < 0.3:  # white streaks through the shapes
        for _ in range(int(rng.integers(1, 4))):
            x, top = int(rng.integers(0, side)), int(rng.integers(0, side - 8))
            a[top : top + int(rng.integers(4, 16)), x] = 1.0
    ink = a.reshape(-1, 3)[a.reshape(-1, 3).min(1) < 0.8]
    if rng.random() < 0.3 and len(ink):  # small fragments in a colour of the image
        for _ in range(int(rng.integers(1, 3))):
            colour = ink[int(rng.integers(len(ink)))]
            (x, y), (w, h) = rng.integers(2, side - 5, size=2), rng.integers(1, 4, size=2)
            a[y : y + h, x : x + w] = colour
    return Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def _view(spec, image: Image.Image, verdict) -> Trajectory:
    critique = {"ok": verdict.correct, "of": "teacher", "position": "first"}
    segments = [
        Segment.prompt(spec.prompt),
        Segment(text="<mode:reflect>", loss=False),
        Segment(image=image, role=ImageRole.DRAFT, loss=False),
        Segment(text=critique_text(verdict, spec, OK_IMAGE), meta={"critique": critique}),
    ]
    meta = {"spec": spec.to_json(), "level": complexity(spec).level, "mode": "reflect"}
    return Trajectory(segments, {**meta, "view": {"position": "first", "ok": verdict.correct}})


def right_or_planted(spec, rng: np.random.Generator, verifier: Verifier) -> Image.Image | None:
    """A render of a scene that satisfies `spec`, or (half the time) of that scene with one of
    the teacher's planted errors; None where no scene satisfies it."""
    try:
        scene = sample_scene(spec, rng)
    except ValueError:
        return None
    if rng.random() < 0.5:
        scene = ShapeWorldTeacher(scene, rng, verifier=verifier)._corrupt(scene, spec)
    return render(scene, 64)


def build(out: Path, n: int, seed: int, split: str, degraded: float) -> dict:
    out.mkdir()
    verifier, rng = Verifier(), np.random.default_rng(seed)
    want = {(level, ok): n // 4 for level in LEVELS for ok in (True, False)}
    counts, lines = Counter(), []
    for i, spec in enumerate(sample_specs(4 * n, seed=seed, split=split)):
        level = complexity(spec).level
        if level not in LEVELS:
            continue
        image = right_or_planted(spec, rng, verifier)
        if image is None:
            continue
        if rng.random() < degraded:
            image = degrade(image, rng)
        verdict = verifier.verify(image, spec)
        if counts[(level, verdict.correct)] >= want[(level, verdict.correct)]:
            continue
        counts[(level, verdict.correct)] += 1
        view = _view(spec, image, verdict)
        lines.append(json.dumps(trajectory_to_record(view, f"{i:07d}r", out)))
        if sum(counts.values()) >= 4 * (n // 4):
            break
    settings = {"seed": seed, "n": sum(counts.values()), "split": split, "degraded": degraded}
    counted = {f"{level}/{ok}": c for (level, ok), c in sorted(counts.items())}
    return write_folder(out, lines, {**settings, "counts": counted}, "render_views.py")


def write_folder(out: Path, lines: list[str], settings: dict, source: str) -> dict:
    """Write critique-view records (`lines`, JSON) to `out` as a data folder `avr.fit` reads:
    shards of 1,000, and a manifest of `settings`, the shards and the folder's build id."""
    shards = [
        write_shard(out / f"shard-{k // 1000:05d}.jsonl", lines[k : k + 1000])
        for k in range(0, len(lines), 1000)
    ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": settings["seed"],
        "n": settings["n"],
        "split": settings["split"],
        "mode": "reflect",
        "resolution": 64,
        **{k: v for k, v in settings.items() if k not in ("seed", "n", "split")},
        "shards": shards,
        "source": f"experiments/probes/{source}",
    }
    manifest["build_id"] = content_id(out, shards)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def critique(model, prompt: str, image: Image.Image) -> str:
    """The model's greedy critique of `image` in a reflect draft's context."""
    from critic_reads import _session  # the probe beside this one

    stop = [["</refine>", model.tokenizer.eos_token]]
    return _session(model, prompt, image).sample_text(96, stop=stop, temperature=0.0).text[0]


@torch.no_grad()
def judge(model_dir: str, data: Path) -> dict:
    model = from_pretrained(model_dir).eval()
    tally = Counter()
    for shard in sorted(data.glob("shard-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            prompt, image = record["segments"][0]["text"], record["segments"][2]["image"]
            said = is_verdict_ok(critique(model, prompt, Image.open(data / image).convert("RGB")))
            tally[(record["meta"]["level"], record["meta"]["view"]["ok"], said)] += 1
    scores = {}
    for level in (*LEVELS, "all"):

        def count(right, said, level=level):
            return sum(
                c
                for (lv, r, s), c in tally.items()
                if level in (lv, "all") and (r, s) == (right, said)
            )

        accepted = count(True, True) / max(1, count(True, True) + count(True, False))
        caught = count(False, False) / max(1, count(False, False) + count(False, True))
        scores[level] = {
            "right_accepted": round(accepted, 3),
            "wrong_caught": round(caught, 3),
            "balanced": round((accepted + caught) / 2, 3),
        }
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("build", help="write a folder of render views")
    made.add_argument("out", type=Path)
    made.add_argument("--n", type=int, default=64000)
    made.add_argument("--seed", type=int, default=71)
    made.add_argument("--split", default="train")
    made.add_argument(
        "--degrade", type=float, default=0.0, help="share of images made to look drawn"
    )
    judged = commands.add_parser("judge", help="score a model's critiques of a folder's views")
    judged.add_argument("model")
    judged.add_argument("data", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "build":
        manifest = build(args.out, args.n, args.seed, args.split, args.degrade)
        print(manifest["n"], manifest["counts"])
    else:
        print(args.model, json.dumps(judge(args.model, args.data)))


if __name__ == "__main__":
    main()
