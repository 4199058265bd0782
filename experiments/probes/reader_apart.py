"""Can the model's own drafts be judged from their pixels at all? A reader trained apart
(docs/self-improvement.md, "A reader apart").

`sample` draws the model's own direct drafts (greedy, the ODE) of simple and medium prompts, has
the verifier judge each against its prompt, and writes them to one `.npz` (images, prompts,
levels, verdicts). `critic` adds the model's own first critique of each draft (read in a reflect
draft's context, as `render_views.py judge` does), so its critic and the reader apart are scored
on the same images. `train` fits a small classifier, prompt and image in, the verifier's verdict
out (a CNN over the 64 px canvas, FiLM-conditioned on a GRU over the prompt's words), balanced
per level and verdict, and scores it on held-out drafts; `--prompt-only` drops the image (how much
of the verdict the prompt alone gives away).

    python experiments/probes/reader_apart.py sample runs/apart-train.npz --n 24000 --split train
    python experiments/probes/reader_apart.py sample runs/apart-test.npz --n 600 --seed 11 \
        --split heldout --draws 4
    python experiments/probes/reader_apart.py critic runs/apart-test.npz
    python experiments/probes/reader_apart.py train runs/apart-train.npz runs/apart-test.npz

`views` turns a sampled file into first-critique views of those drafts (the prompt and
`<mode:reflect>` read, the draft read, the verifier's critique trained; balanced per level and
verdict), a data folder `avr.fit` trains on; `widen` writes a copy of a model whose reader (the
SigLIP encoder and its connector) is replaced by a new, larger one, randomly initialised, every
other weight kept, to ask whether the unified model's critic is short of a reader.

    python experiments/probes/reader_apart.py views runs/apart-train.npz runs/apart-views \
        --n 30000 --seed 81 --split train
    python experiments/probes/reader_apart.py widen runs/wide-reader --patch 8 --width 128 --layers 3
    python experiments/probes/reader_apart.py critic runs/apart-test.npz --model DIR --key said_DIR

`renders` writes the same kind of file from teacher renders (half with a planted error): the
reader's check that it can read at all.

    python experiments/probes/reader_apart.py renders runs/renders-train.npz --n 30000 --seed 71
    python experiments/probes/reader_apart.py renders runs/renders-test.npz --n 2400 --seed 7 \
        --split heldout
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from avr.backbone import from_pretrained
from avr.conditioning import sample_direct
from avr.world import Verifier, complexity, sample_specs

sys.path.insert(0, str(Path(__file__).parent))
from render_views import _view, critique, right_or_planted, write_folder

LEVELS = ("simple", "medium")


def sample(out: Path, model_dir: str, n: int, seed: int, split: str, draws: int) -> dict:
    specs = [s for s in sample_specs(n, seed=seed, split=split) if complexity(s).level in LEVELS]
    model, verifier = from_pretrained(model_dir), Verifier()
    images, rows = [], []
    start = time.time()
    for draw in range(draws):
        drawn = sample_direct(model, specs, steps=10, seed=seed * 1000 + draw)
        for spec, image in zip(specs, drawn, strict=True):
            images.append(image)
            rows.append((spec.prompt, complexity(spec).level, verifier.verify(image, spec).correct))
    ok = _save(out, images, rows)
    return {
        "drafts": len(rows),
        "right": round(float(ok.mean()), 3),
        "s": round(time.time() - start),
    }


def _save(out: Path, images: list[np.ndarray], rows: list[tuple[str, str, bool]]) -> np.ndarray:
    """Write images and their (prompt, level, verdict) rows to `out` (`.npz`); the verdicts."""
    ok = np.array([r[2] for r in rows])
    np.savez_compressed(
        out,
        images=np.stack(images),
        prompts=np.array([r[0] for r in rows]),
        levels=np.array([r[1] for r in rows]),
        ok=ok,
    )
    return ok


def views(data: Path, out: Path, n: int, seed: int, split: str) -> dict:
    """First-critique views of the drafts in `data` (sampled with the same `n`, `seed`, `split`
    and one draw: row i is the i-th kept spec), balanced per level and verdict."""
    from avr.sequence import trajectory_to_record

    found = dict(np.load(data))
    specs = [s for s in sample_specs(n, seed=seed, split=split) if complexity(s).level in LEVELS]
    if len(specs) != len(found["prompts"]) or any(
        s.prompt != str(p) for s, p in zip(specs, found["prompts"], strict=True)
    ):
        raise ValueError(f"{data}: not sampled with --n {n} --seed {seed} --split {split}")
    keep = balanced(found, seed)
    out.mkdir()
    lines = [
        json.dumps(trajectory_to_record(view, f"{i:07d}o", out))
        for i, view in zip(keep, draft_views(found, specs, keep, Verifier()), strict=True)
    ]
    settings = {"seed": seed, "n": len(keep), "split": split}
    manifest = write_folder(out, lines, settings, "reader_apart.py views")
    return {k: manifest[k] for k in ("n", "build_id")}


def balanced(found: dict, seed: int) -> list[int]:
    """Rows of a sampled file, as many right drafts as wrong ones within each level, shuffled."""
    rng, keep = np.random.default_rng(seed), []
    for level in LEVELS:
        cells = [
            np.flatnonzero((found["levels"] == level) & (found["ok"] == ok)) for ok in (True, False)
        ]
        size = min(map(len, cells))
        keep += [int(i) for c in cells for i in rng.choice(c, size, replace=False)]
    rng.shuffle(keep)
    return keep


def draft_views(found: dict, specs: list, rows: list[int], verifier: Verifier) -> list:
    """The first-critique view of each draft in `rows`: the verifier's critique of it, trained."""
    views = []
    for i in rows:
        image = Image.fromarray(found["images"][i])
        views.append(_view(specs[i], image, verifier.verify(image, specs[i])))
    return views


def widen(out: Path, model_dir: str, patch: int, width: int, layers: int, seed: int) -> dict:
    """`model_dir` with a new reader: SigLIP of `layers` × `width` on `patch` px patches."""
    from avr.backbone.config import UnifiedConfig
    from avr.backbone.model import UnifiedModel

    torch.manual_seed(seed)
    source = from_pretrained(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["vision"] = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_attention_heads": max(1, width // 32),
        "num_hidden_layers": layers,
        "patch_size": patch,
    }
    model = UnifiedModel(UnifiedConfig.from_dict(config), source.tokenizer)
    theirs, mine = source.state_dict(), model.state_dict()
    kept = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    fresh = sorted(k for k in mine if k not in kept)
    model.load_state_dict(kept, strict=False)
    model.save_pretrained(out)
    reader = sum(v.numel() for k, v in mine.items() if k in fresh)
    return {"fresh": sorted({k.split(".")[0] for k in fresh}), "fresh_params": reader}


def renders(out: Path, n: int, seed: int, split: str) -> dict:
    """The same file of teacher renders instead of drafts: a scene that satisfies the prompt, or
    (half the time) that scene with one planted error, judged by the verifier (the reader's
    sanity check: on renders the picture decides)."""
    verifier, rng = Verifier(), np.random.default_rng(seed)
    images, rows = [], []
    for spec in sample_specs(n, seed=seed, split=split):
        if complexity(spec).level not in LEVELS:
            continue
        drawn = right_or_planted(spec, rng, verifier)
        if drawn is None:
            continue
        image = np.asarray(drawn, np.uint8)
        images.append(image)
        rows.append((spec.prompt, complexity(spec).level, verifier.verify(image, spec).correct))
    ok = _save(out, images, rows)
    return {"renders": len(rows), "right": round(float(ok.mean()), 3)}


@torch.no_grad()
def critic(data: Path, model_dir: str, key: str = "said_ok") -> dict:
    """The model's own first critique of every draft in `data`: `said_ok` in the file itself,
    another `key` in `DATA.KEY.npy` beside it."""
    from avr.data.critique import is_verdict_ok

    found = dict(np.load(data))
    model = from_pretrained(model_dir).eval()
    said = [
        is_verdict_ok(critique(model, str(p), Image.fromarray(im)))
        for p, im in zip(found["prompts"], found["images"], strict=True)
    ]
    said = np.array(said)
    if key == "said_ok":  # the critic the reader apart is compared with, in the file itself
        np.savez_compressed(data, **{**found, key: said})
    else:
        np.save(data.with_suffix(f".{key}.npy"), said)
    return score(found["ok"], said, found["levels"])


def score(ok: np.ndarray, said: np.ndarray, levels: np.ndarray) -> dict:
    out = {}
    for level in (*LEVELS, "all"):
        keep = np.ones_like(ok) if level == "all" else levels == level
        accepted = float(said[keep & ok].mean())
        caught = float((~said[keep & ~ok]).mean())
        out[level] = {
            "right_accepted": round(accepted, 3),
            "wrong_caught": round(caught, 3),
            "balanced": round((accepted + caught) / 2, 3),
            "n": int(keep.sum()),
        }
    return out


def words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", prompt.lower())


class Reader(nn.Module):
    """Prompt words → a GRU; the canvas → a CNN whose features the prompt scales and shifts
    (FiLM) at every stage; the verdict from the conditioned feature map, positions kept."""

    def __init__(self, vocab: int, width: int = 32, text: int = 128, use_image: bool = True):
        super().__init__()
        self.use_image = use_image
        self.embed = nn.Embedding(vocab, 64, padding_idx=0)
        self.gru = nn.GRU(64, text // 2, batch_first=True, bidirectional=True)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
            for i, (a, b) in enumerate(itertools.pairwise(chans))
        )
        self.films = nn.ModuleList(nn.Linear(text, 2 * c) for c in chans[1:])
        grid = 8 * 8 * chans[-1] if use_image else 0
        self.head = nn.Sequential(nn.Linear(grid + text, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens > 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, hidden = self.gru(packed)
        t = torch.cat([hidden[0], hidden[1]], -1)
        if not self.use_image:
            return self.head(t).squeeze(-1)
        x = images
        for conv, film in zip(self.convs, self.films, strict=True):
            scale, shift = film(t).chunk(2, -1)
            x = F.relu(conv(x) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.head(torch.cat([x.flatten(1), t], -1)).squeeze(-1)


def _tensors(found, vocab: dict[str, int]):
    images = torch.from_numpy(found["images"]).permute(0, 3, 1, 2).float() / 255
    seqs = [[vocab.get(w, 1) for w in words(str(p))] for p in found["prompts"]]
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return images, tokens, torch.from_numpy(found["ok"]).float()


def train(
    train_path: Path,
    test_path: Path,
    steps: int,
    width: int,
    prompt_only: bool,
    seed: int,
    holdout: int = 0,
):
    """Fit a reader on `train_path` (less its last `holdout` drafts) and score it on `test_path`
    and, with `holdout`, on those last drafts: train-split prompts it did not train on, whose
    word combinations it has seen (the held-out split's are new)."""
    torch.manual_seed(seed)
    found, held = dict(np.load(train_path)), dict(np.load(test_path))
    tail = {k: v[len(v) - holdout :] for k, v in found.items()} if holdout else None
    found = {k: v[: len(v) - holdout] for k, v in found.items()}
    vocab = {"<pad>": 0, "<unk>": 1}
    for p in found["prompts"]:
        for w in words(str(p)):
            vocab.setdefault(w, len(vocab))
    images, tokens, ok = _tensors(found, vocab)
    test_images, test_tokens, _ = _tensors(held, vocab)
    # each (level, verdict) cell weighs the same in the loss
    cell = np.array([f"{lv}/{o}" for lv, o in zip(found["levels"], found["ok"], strict=True)])
    names, counts = np.unique(cell, return_counts=True)
    weight = torch.from_numpy(
        np.array([len(cell) / (len(names) * counts[names == c][0]) for c in cell])
    ).float()
    model = Reader(len(vocab), width=width, use_image=not prompt_only)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    start, curve = time.time(), []
    for step in range(steps):
        idx = torch.randint(len(ok), (128,), generator=gen)
        x = images[idx]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # ±1 px: no verdict flips
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.binary_cross_entropy_with_logits(
            model(x, tokens[idx]), ok[idx], weight=weight[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            curve.append((step + 1, round(_test(model, test_images, test_tokens, held), 3)))
            print(
                f"step {step + 1} loss {loss.item():.3f} held-out balanced {curve[-1][1]}",
                flush=True,
            )
    said = _predict(model, test_images, test_tokens)
    result = {
        "params": params,
        "train_drafts": len(ok),
        "steps": steps,
        "s": round(time.time() - start),
        "curve": curve,
        "reader": score(held["ok"], said, held["levels"]),
    }
    if "said_ok" in held:
        result["own_critic"] = score(held["ok"], held["said_ok"], held["levels"])
    if tail is not None:
        said = _predict(model, *_tensors(tail, vocab)[:2])
        result["reader_train_split"] = score(tail["ok"], said, tail["levels"])
    return result


@torch.no_grad()
def _predict(model: Reader, images: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """The reader's verdicts (True: right), in eval mode, 512 at a time; its mode restored."""
    was_training = model.training
    model.eval()
    logits = [model(images[i : i + 512], tokens[i : i + 512]) for i in range(0, len(tokens), 512)]
    model.train(was_training)
    return (torch.cat(logits) > 0).numpy()


def _test(model, images, tokens, held) -> float:
    return score(held["ok"], _predict(model, images, tokens), held["levels"])["all"]["balanced"]


def prompts_drawn(
    command: argparse.ArgumentParser,
    seed: int,
    n: int = 24000,
    split: str = "train",
    seed_flag: str = "--seed",
) -> None:
    """The flags that say which prompts a file holds (`views` must repeat its `sample`'s)."""
    command.add_argument("--n", type=int, default=n, help="prompts drawn (simple, medium kept)")
    command.add_argument(seed_flag, type=int, default=seed)
    command.add_argument("--split", default=split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("sample", help="the model's own drafts, judged by the verifier")
    s.add_argument("out", type=Path)
    s.add_argument("--model", default="checkpoints/shapeworld-tiny-self")
    prompts_drawn(s, seed=81)
    s.add_argument("--draws", type=int, default=1, help="drafts per prompt")
    c = commands.add_parser("critic", help="the model's own first critique of each draft")
    c.add_argument("data", type=Path)
    c.add_argument("--model", default="checkpoints/shapeworld-tiny-self")
    c.add_argument("--key", default="said_ok", help="where the verdicts are stored in the file")
    r = commands.add_parser("renders", help="the same file of teacher renders")
    r.add_argument("out", type=Path)
    prompts_drawn(r, seed=71)
    v = commands.add_parser("views", help="first-critique views of sampled drafts")
    v.add_argument("data", type=Path)
    v.add_argument("out", type=Path)
    prompts_drawn(v, seed=81)
    w = commands.add_parser("widen", help="a model with a new, larger reader")
    w.add_argument("out", type=Path)
    w.add_argument("--model", default="checkpoints/shapeworld-tiny-self")
    w.add_argument("--patch", type=int, default=8)
    w.add_argument("--width", type=int, default=128)
    w.add_argument("--layers", type=int, default=3)
    w.add_argument("--seed", type=int, default=0)
    t = commands.add_parser("train", help="fit and score a reader apart")
    t.add_argument("train", type=Path)
    t.add_argument("test", type=Path)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--prompt-only", action="store_true")
    t.add_argument("--holdout", type=int, default=0, help="last drafts kept out of training")
    args = parser.parse_args()
    if args.command == "sample":
        result = sample(args.out, args.model, args.n, args.seed, args.split, args.draws)
    elif args.command == "critic":
        result = critic(args.data, args.model, args.key)
    elif args.command == "renders":
        result = renders(args.out, args.n, args.seed, args.split)
    elif args.command == "views":
        result = views(args.data, args.out, args.n, args.seed, args.split)
    elif args.command == "widen":
        result = widen(args.out, args.model, args.patch, args.width, args.layers, args.seed)
    else:
        result = train(
            args.train,
            args.test,
            args.steps,
            args.width,
            args.prompt_only,
            args.seed,
            args.holdout,
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
