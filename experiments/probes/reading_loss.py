"""Does the model's critic read its own drafts when its reading is supervised pixel by pixel?
(docs/self-improvement.md, "Reading the canvas, every pixel supervised").

`canvas_reader.py` showed a small network reads the verifier's verdict of the model's own drafts
from their pixels (every pixel labelled with the verifier's detection) far better than any critic
trained on the verdict alone. Here the model itself gets that supervision: first-critique views of
its own drafts (the prompt and `<mode:reflect>` read, the draft read, the verifier's critique
trained, balanced per level and verdict, as `reader_apart.py views` builds them), and beside the
usual loss a linear head on the model's last hidden states at the draft's read tokens labels every
pixel of the draft as `canvas_reader.py` does (`--aux 0` is the control: the same loop, the views
alone shaping the model, the head trained on its detached states as a probe). The head is thrown
away afterwards: only the model is saved, and its critic is scored with `reader_apart.py critic`. `readout` scores what the head reads (the verdict from its label
maps): how much of the canvas the model's states hold, beside what its critique says.

    python experiments/probes/reading_loss.py train runs/apart-train.npz runs/aux-1 --aux 1
    python experiments/probes/reading_loss.py train runs/apart-train.npz runs/aux-0 --aux 0
    python experiments/probes/reader_apart.py critic runs/apart-test.npz --model runs/aux-1 --key said_aux1
    python experiments/probes/reading_loss.py readout runs/aux-1 runs/apart-test.npz
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from avr.backbone import from_pretrained
from avr.backbone.packing import READ
from avr.machine import cpu_bf16
from avr.world import Verifier

sys.path.insert(0, str(Path(__file__).parent))
from canvas_reader import CLASSES, SIZE, labels, specs_of, verdicts
from reader_apart import balanced, draft_views, prompts_drawn, score


class PixelHead(nn.Module):
    """Each read token's hidden state → class logits for every pixel of its patch."""

    def __init__(self, width: int, patch: int):
        super().__init__()
        self.patch, self.tokens = patch, (SIZE // patch) ** 2
        self.out = nn.Linear(width, patch * patch * CLASSES)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[K * g * g, D]` (images, then row-major patches) → `[K, CLASSES, 64, 64]`."""
        grid, p = SIZE // self.patch, self.patch
        x = self.out(hidden).reshape(-1, grid, grid, p, p, CLASSES)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, CLASSES, SIZE, SIZE)


class _Capture:
    """Wraps `model.run_layers` to keep its last output (the last hidden states of a batch)."""

    def __init__(self, model):
        self.inner, self.hidden = model.run_layers, None
        model.run_layers = self

    def __call__(self, *args, **kwargs):
        self.hidden = self.inner(*args, **kwargs)
        return self.hidden


def _pixel_labels(read_pixels: torch.Tensor, verifier: Verifier) -> torch.Tensor:
    images = (read_pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return torch.from_numpy(labels(images, verifier)).long()


def train(
    data: Path,
    out: Path,
    model_dir: str,
    aux: float,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    background: float,
    drawn: tuple[int, int, str],
) -> dict:
    """Views of the drafts in `data` (sampled from the prompts `drawn`), `steps`
    steps of `batch`, AdamW with 20 warmup steps and a cosine to 0.1·lr, bf16 autocast where the
    CPU has it; the model saved to `out` (the head beside it, `reading_head.safetensors`)."""
    torch.manual_seed(seed)
    found, verifier = dict(np.load(data)), Verifier()
    specs = specs_of(found["prompts"], *drawn)
    rows = balanced(found, seed)
    model = from_pretrained(model_dir).train()
    patch = model.config.vision.get("patch_size", 16)
    head = PixelHead(model.lm.config.hidden_size, patch)
    saved = Path(model_dir) / "reading_head.safetensors"
    if saved.exists():  # a run of this probe goes on (its optimizer state starts afresh)
        head.load_state_dict(load_file(str(saved)))
    capture = _Capture(model)
    packer = model.packer(2048)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < 20:
            return (step + 1) / 20
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 20) / max(1, steps - 20)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    bf16 = bool(cpu_bf16())
    weight = torch.ones(CLASSES)
    weight[0] = background  # most pixels are background: unweighted, every argmax is background
    start, log = time.time(), []
    totals = {"text": 0.0, "read": 0.0}
    for step in range(steps):
        chunk = [rows[(step * batch + j) % len(rows)] for j in range(batch)]
        packed = packer(
            draft_views(found, specs, chunk, verifier), [seed * 100_000 + i for i in chunk]
        )
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _ = model.sft_loss(packed)
            read = capture.hidden[packed.token_type == READ]
            # the control trains the head on detached states: a probe of what they hold
            logits = head((read if aux else read.detach()).float())
        reading = F.cross_entropy(
            logits.float(), _pixel_labels(packed.read_pixels, verifier), weight=weight
        )
        total = loss + (aux or 1.0) * reading
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        totals["text"] += float(loss)
        totals["read"] += float(reading)
        if (step + 1) % 100 == 0:
            log.append({k: round(v / 100, 4) for k, v in totals.items()} | {"step": step + 1})
            totals = {"text": 0.0, "read": 0.0}
            print(json.dumps(log[-1] | {"s": round(time.time() - start)}), flush=True)
    model.run_layers = capture.inner
    model.eval().save_pretrained(out)
    save_file(head.state_dict(), str(out / "reading_head.safetensors"))
    return {
        "views": len(rows),
        "steps": steps,
        "aux": aux,
        "s": round(time.time() - start),
        "log": log,
    }


@torch.no_grad()
def readout(model_dir: Path, data: Path, drawn: tuple[int, int, str]) -> dict:
    """The head's label maps of the drafts in `data` (each read in its first-critique view),
    scored as `canvas_reader.py` scores its reader: the verdict from the maps alone."""
    found, verifier = dict(np.load(data)), Verifier()
    specs = specs_of(found["prompts"], *drawn)
    model = from_pretrained(str(model_dir)).eval()
    head = PixelHead(model.lm.config.hidden_size, model.config.vision.get("patch_size", 16))
    head.load_state_dict(load_file(str(model_dir / "reading_head.safetensors")))
    capture = _Capture(model)
    packer = model.packer(2048)
    maps = np.zeros((len(specs), SIZE, SIZE), np.uint8)
    for first in range(0, len(specs), 64):
        rows = np.arange(first, min(first + 64, len(specs)))
        packed = packer(draft_views(found, specs, rows, verifier), rows.tolist())
        model(packed)
        read = packed.token_type == READ
        # packing puts the longest trajectories first: each image's own view says whose it is
        owner = packed.sample[read].reshape(-1, head.tokens)[:, 0].numpy()
        maps[rows[owner]] = head(capture.hidden[read]).argmax(1).numpy()
    truth = labels(found["images"], verifier)
    fg = truth > 0
    said = verdicts(maps, specs, verifier)
    return {
        "pixels_right_on_objects": round(float((maps[fg] == truth[fg]).mean()), 4),
        "reader": score(found["ok"], said, found["levels"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="views of own drafts, with or without the reading loss")
    t.add_argument("data", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--model", default="checkpoints/shapeworld-tiny-self")
    t.add_argument("--aux", type=float, default=1.0, help="weight of the reading loss (0: control)")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--background", type=float, default=0.3, help="weight of background pixels")
    prompts_drawn(t, 81, 30000, "train", "--seed-drawn")  # the drafts' prompts
    r = commands.add_parser("readout", help="score what the reading head reads")
    r.add_argument("model", type=Path)
    r.add_argument("data", type=Path)
    prompts_drawn(r, 11, 600, "heldout", "--seed-drawn")
    args = parser.parse_args()
    if args.command == "train":
        result = train(
            args.data,
            args.out,
            args.model,
            args.aux,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            args.background,
            (args.n, args.seed_drawn, args.split),
        )
    else:
        result = readout(args.model, args.data, (args.n, args.seed_drawn, args.split))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
