"""Can the model's own drafts be read when every pixel is supervised? A segmenting reader apart
(docs/self-improvement.md, "Reading the canvas, every pixel supervised").

The verdict on a draft is one bit per image, and a reader trained on it (`reader_apart.py train`)
fits the prompt's prior. Here the reader never sees the prompt: a small U-Net labels every pixel of
the 64 px canvas with what the verifier detects there (background, or one of 6 colours × 3 shapes:
each detection's fitted shape painted where it covers more than half a pixel; blobs the verifier
rejects are background), trained on the `.npz` files `reader_apart.py sample` and `renders` write.
Its label map is read back into detections (connected components per class, each boxed from its
area and centroid as the verifier's fit does) and the verifier's own rules score them against the
prompt: the verdict comes from the canvas alone.

    python experiments/probes/canvas_reader.py oracle runs/apart-test.npz
    python experiments/probes/canvas_reader.py train runs/apart-train.npz runs/apart-test.npz \
        --steps 3000

`oracle` reads the verifier's own label maps back the same way: how much of the verdict survives
the label map itself (the ceiling of any reader of this kind).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from avr.machine import cpu_bf16
from avr.world import Verifier, sample_specs
from avr.world.render import coverage
from avr.world.scene import COLORS, SHAPES
from avr.world.verify import Detection, shape_box

sys.path.insert(0, str(Path(__file__).parent))
from reader_apart import prompts_drawn, score

CLASSES = 1 + len(COLORS) * len(SHAPES)  # background, then colour-major (colour, shape)
SIZE = 64


def paint(detections) -> np.ndarray:
    """The label map of `detections` (largest first, so smaller objects are painted over)."""
    out = np.zeros((SIZE, SIZE), np.uint8)
    for d in detections:
        mask = coverage(d.shape, d.box, (0, 0, SIZE, SIZE)) > 0.5
        out[mask] = 1 + COLORS.index(d.color) * len(SHAPES) + SHAPES.index(d.shape)
    return out


def labels(images: np.ndarray, verifier: Verifier) -> np.ndarray:
    """The verifier's label map of every image: `[N, 64, 64]` class indices."""
    return np.stack([paint(verifier.detect(im)) for im in images])


def detections(label: np.ndarray, verifier: Verifier) -> list[Detection]:
    """A label map read back into detections: each connected component of one class is an object,
    boxed from its area and centroid as the verifier's shape fit boxes a blob; specks smaller than
    the verifier's smallest object are dropped."""
    min_pixels = max(3.0, verifier.min_area * label.size)
    found = []
    for c in range(1, CLASSES):
        parts, n = ndimage.label(label == c)
        for j in range(1, n + 1):
            ys, xs = np.nonzero(parts == j)
            area = float(len(ys))
            if area < min_pixels:
                continue
            color, shape = COLORS[(c - 1) // len(SHAPES)], SHAPES[(c - 1) % len(SHAPES)]
            cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)
            found.append(Detection(shape, color, shape_box(shape, area, cx, cy), area))
    return sorted(found, key=lambda d: -d.area)


class _Given(Verifier):
    """The verifier's scoring rules over detections given in place of an image."""

    def detect(self, image):
        return list(image)


def specs_of(prompts: np.ndarray, n: int, seed: int, split: str) -> list:
    """The spec of every prompt in a file sampled from `sample_specs(n, seed, split)`."""
    known = {s.prompt: s for s in sample_specs(n, seed=seed, split=split)}
    missing = sorted({str(p) for p in prompts} - known.keys())
    if missing:
        raise ValueError(
            f"{len(missing)} prompts (e.g. {missing[0]!r}) are not among "
            f"sample_specs({n}, seed={seed}, split={split!r}): pass the file's --n/--seed/--split"
        )
    return [known[str(p)] for p in prompts]


def verdicts(maps: np.ndarray, specs: list, verifier: Verifier) -> np.ndarray:
    """The verifier's rules applied to the objects each label map holds, against its spec."""
    judge = _Given()
    return np.array(
        [
            judge.verify(detections(m, verifier), spec).correct
            for m, spec in zip(maps, specs, strict=True)
        ]
    )


def scenes_equal(maps: np.ndarray, truth: np.ndarray, verifier: Verifier) -> float:
    """Share of canvases whose objects (colour, shape) read back from `maps` are those of `truth`."""

    def census(m):
        return sorted((d.color, d.shape) for d in detections(m, verifier))

    return float(np.mean([census(a) == census(b) for a, b in zip(maps, truth, strict=True)]))


def oracle(data: Path, drawn: tuple[int, int, str]) -> dict:
    found, verifier = dict(np.load(data)), Verifier()
    maps = labels(found["images"], verifier)
    said = verdicts(maps, specs_of(found["prompts"], *drawn), verifier)
    return {
        "agree": round(float((said == found["ok"]).mean()), 4),
        **score(found["ok"], said, found["levels"]),
    }


class UNet(nn.Module):
    """Three stride-2 stages down (64 → 8 px), three up with skips, a class per pixel."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]

        def block(a, b):
            return nn.Sequential(
                nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
            )  # fmt: skip

        self.stem = block(3, chans[0])
        self.down = nn.ModuleList(block(a, b) for a, b in itertools.pairwise(chans))
        self.up = nn.ModuleList(
            block(b + a, a) for a, b in zip(chans[-2::-1], chans[:0:-1], strict=True)
        )
        self.head = nn.Conv2d(chans[0], CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(F.avg_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up in self.up:
            x = up(torch.cat([F.interpolate(x, scale_factor=2.0), skips.pop()], 1))
        return self.head(x)


def _images(found) -> torch.Tensor:
    return torch.from_numpy(found["images"]).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def _read(model: UNet, images: torch.Tensor) -> np.ndarray:
    model.eval()
    maps = [model(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)]
    model.train()
    return torch.cat(maps).numpy().astype(np.uint8)


def train(
    train_paths: list[Path],
    test_path: Path,
    drawn: tuple[int, int, str],
    steps: int,
    width: int,
    seed: int,
    batch: int,
) -> dict:
    """Fit the segmenter on the label maps of `train_paths`' images and score its verdicts (and
    scenes) on `test_path`'s drafts, beside the file's own critic where it holds one."""
    torch.manual_seed(seed)
    verifier = Verifier()
    bf16 = bool(cpu_bf16())  # AMX or AVX512-BF16: about 3x the float32 step here
    start = time.time()
    parts = [dict(np.load(p)) for p in train_paths]
    images = torch.cat([_images(p) for p in parts])
    target = torch.from_numpy(np.concatenate([labels(p["images"], verifier) for p in parts])).long()
    held = dict(np.load(test_path))
    specs = specs_of(held["prompts"], *drawn)
    test_images, test_maps = _images(held), labels(held["images"], verifier)
    prepared = round(time.time() - start)
    model = UNet(width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.ones(CLASSES)
    weight[0] = 0.3  # most pixels are background
    curve, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x, y = images[idx], target[idx]
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # objects move with their labels
        x, y = torch.roll(x, shift, (2, 3)), torch.roll(y, shift, (1, 2))
        if torch.rand((), generator=gen) < 0.5:  # a mirror keeps every shape and swaps left/right
            x, y = x.flip(3), y.flip(2)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            said = verdicts(_read(model, test_images), specs, verifier)
            balanced = score(held["ok"], said, held["levels"])["all"]["balanced"]
            curve.append((step + 1, round(float(loss), 4), balanced))
            print(
                f"step {step + 1} loss {loss.item():.4f} held-out balanced {balanced}", flush=True
            )
    maps = _read(model, test_images)
    said = verdicts(maps, specs, verifier)
    fg = test_maps > 0
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_images": len(images),
        "steps": steps,
        "batch": batch,
        "bf16": bf16,
        "prepare_s": prepared,
        "s": round(time.time() - start),
        "curve": curve,
        "pixels_right_on_objects": round(float((maps[fg] == test_maps[fg]).mean()), 4),
        "scenes_equal_verifier": round(scenes_equal(maps, test_maps, verifier), 4),
        "reader": score(held["ok"], said, held["levels"]),
    }
    if "said_ok" in held:
        result["own_critic"] = score(held["ok"], held["said_ok"], held["levels"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    o = commands.add_parser("oracle", help="the verifier's own label maps read back")
    o.add_argument("data", type=Path)
    prompts_drawn(o, 11, 600, "heldout", "--seed-drawn")  # the scored file's prompts
    t = commands.add_parser("train", help="fit and score the segmenting reader")
    t.add_argument("train", type=Path, nargs="+", help="sampled or rendered .npz files")
    t.add_argument("test", type=Path)
    prompts_drawn(t, 11, 600, "heldout", "--seed-drawn")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "oracle":
        result = oracle(args.data, (args.n, args.seed_drawn, args.split))
    else:
        drawn = (args.n, args.seed_drawn, args.split)
        result = train(args.train, args.test, drawn, args.steps, args.width, args.seed, args.batch)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
