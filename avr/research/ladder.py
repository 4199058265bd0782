"""The conditioning ladder: text→image toy tasks of rising difficulty, each trained from scratch
in minutes on a CPU, so that a recipe change can be judged on the rung where conditioning fails
before hours go into a real run. Its last rung asks for what an edit needs first: redraw an image
the model has just read (`avr.conditioning.copy_error` judges it).

    python -m avr.research.ladder --rung 3 --steps 300 --set timestep_shift=3 --out rung3.png

A rung trains through `SFTModule` and the packer, as every SFT run does (a Lightning `Trainer` on a
stream of the rung's trajectories), then judges new prompts of the same rung with
`avr.conditioning`'s measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from rich.console import Console

from avr.backbone.config import UnifiedConfig
from avr.backbone.model import UnifiedModel
from avr.conditioning import (
    copy_error,
    copy_trajectory,
    direct_trajectory,
    judge,
    prompt_fidelity,
    shuffled_loss_ratio,
    swapped_input_loss,
)
from avr.defaults import tiny_model
from avr.lit.sft import SFTModule
from avr.machine import describe
from avr.sequence import Trajectory
from avr.world import (
    COLORS,
    SHAPES,
    Clause,
    PromptSpec,
    Scene,
    SceneObject,
    sample_scene,
    sample_spec,
)


def _one(shape: str, color: str, size: float, x: float = 0.5, y: float = 0.5):
    spec = PromptSpec("single_object", f"a {color} {shape}", (Clause(shape, 1, color),))
    return spec, Scene((SceneObject(shape, color, x, y, size),))


def _two_fixed(rng: np.random.Generator):
    if rng.random() < 0.5:
        return _one("square", "red", 0.4, 0.3, 0.3)
    return _one("circle", "blue", 0.4, 0.7, 0.7)


def _colour_fixed(rng: np.random.Generator):
    return _one("square", COLORS[rng.integers(len(COLORS))], 0.35)


def _colour_placed(rng: np.random.Generator):
    x, y = rng.uniform(0.25, 0.75, 2)
    return _one("square", COLORS[rng.integers(len(COLORS))], 0.35, float(x), float(y))


def _colour_shape(rng: np.random.Generator):
    x, y = rng.uniform(0.25, 0.75, 2)
    shape = SHAPES[rng.integers(len(SHAPES))]
    return _one(shape, COLORS[rng.integers(len(COLORS))], 0.35, float(x), float(y))


def _from_tags(*tags: str) -> Callable[[np.random.Generator], tuple[PromptSpec, Scene]]:
    def draw(rng: np.random.Generator):
        spec = sample_spec(tags[rng.integers(len(tags))], rng)
        return spec, sample_scene(spec, rng)

    return draw


@dataclass(frozen=True)
class Rung:
    """One toy task: what it asks, and how to draw a (spec, scene) pair from a generator."""

    name: str
    draw: Callable[[np.random.Generator], tuple[PromptSpec, Scene]]
    reads: bool = False
    """The model reads the target scene before drawing it (`copy_trajectory`), instead of
    drawing from the prompt alone (`direct_trajectory`)."""

    def trajectory(self, spec: PromptSpec, scene: Scene, resolution: int) -> Trajectory:
        """This rung's training trajectory for one (spec, scene)."""
        build = copy_trajectory if self.reads else direct_trajectory
        return build(spec, scene, resolution)


RUNGS: dict[int, Rung] = {
    1: Rung("two prompts, two fixed images", _two_fixed),
    2: Rung("one square at a fixed place, colour named", _colour_fixed),
    3: Rung("one square at a random place, colour named", _colour_placed),
    4: Rung("one object at a random place, colour and shape named", _colour_shape),
    5: Rung("ShapeWorld single and two objects", _from_tags("single_object", "two_object")),
    6: Rung("ShapeWorld counts and relations", _from_tags("counting", "position", "color_attr")),
    7: Rung(
        "copy: redraw a ShapeWorld scene (single and two objects) just read",
        _from_tags("single_object", "two_object"),
        reads=True,
    ),
}


@dataclass
class ClimbResult:
    """What one ladder run measured."""

    rung: int
    steps: int
    seconds: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    fidelity: dict[str, float] = field(default_factory=dict)
    loss_right: float = float("nan")
    loss_shuffled: float = float("nan")
    """Image loss with the right and with shuffled conditions: the prompts, or on a rung that
    reads (`Rung.reads`) the input images."""
    copy_own: float = float("nan")
    copy_other: float = float("nan")
    """On a rung that reads: `copy_error`'s pixel differences to the own and another input."""
    images: np.ndarray | None = None
    model: UnifiedModel | None = None


class _RungStream(torch.utils.data.IterableDataset):
    """`steps` packed batches of `batch_size` fresh trajectories of one rung (noise seeds never
    repeat), drawn from `rng`."""

    def __init__(self, task: Rung, module: SFTModule, batch_size: int, steps: int, rng) -> None:
        super().__init__()
        self.task, self.module, self.batch_size, self.steps, self.rng = (
            task,
            module,
            batch_size,
            steps,
            rng,
        )

    def __iter__(self) -> Iterator:
        side, packer = self.module.backbone.config.image_size, self.module.packer
        for step in range(self.steps):
            pairs = [self.task.draw(self.rng) for _ in range(self.batch_size)]
            trajectories = [self.task.trajectory(spec, scene, side) for spec, scene in pairs]
            yield packer(trajectories, [step * self.batch_size + i for i in range(self.batch_size)])


class _LossCurve(L.Callback):
    """Every 50 steps and at the last, the step's image loss (and `log` told)."""

    def __init__(self, result: ClimbResult, log: Callable[[str], None] | None) -> None:
        self.result, self.say = result, log

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if batch_idx % 50 and batch_idx != trainer.max_steps - 1:
            return
        loss = float(trainer.callback_metrics["train/loss/image"])
        self.result.loss_curve.append((batch_idx, loss))
        if self.say is not None:
            self.say(f"rung {self.result.rung} step {batch_idx}: image loss {loss:.4f}")


def climb(
    rung: int,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup: int = 30,
    config: UnifiedConfig | None = None,
    seed: int = 0,
    eval_prompts: int = 48,
    sample_steps: int = 10,
    model: UnifiedModel | None = None,
    log: Callable[[str], None] | None = None,
) -> ClimbResult:
    """Train a fresh tiny model (or `model`) on rung `rung`'s trajectories with `SFTModule` (AdamW,
    `warmup` steps of linear warmup, then a constant rate; gradients clipped at 1), then judge it
    on `eval_prompts` new prompts of the same rung."""
    if rung not in RUNGS:
        raise ValueError(f"unknown rung {rung}; expected one of {', '.join(map(str, RUNGS))}")
    task = RUNGS[rung]
    module = SFTModule(None, seed, lr=lr, weight_decay=0.0, warmup_steps=warmup, min_lr_ratio=1.0)
    module.backbone = model = model or tiny_model(seed, config)
    module.max_len = model.config.max_seq_len
    result = ClimbResult(rung, steps, 0.0, model=model)
    stream = _RungStream(task, module, batch_size, steps, np.random.default_rng([seed, rung]))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_LossCurve(result, log)],
    )
    start = time.perf_counter()
    with warnings.catch_warnings():  # a one-process stream on the CPU, on purpose
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        trainer.fit(module, torch.utils.data.DataLoader(stream, batch_size=None))
    result.seconds = time.perf_counter() - start
    model.eval()
    held_out = np.random.default_rng([seed, rung, 1])
    pairs = [task.draw(held_out) for _ in range(eval_prompts)]
    specs, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    if task.reads:
        result.copy_own, result.copy_other, result.images = copy_error(
            model, specs, scenes, sample_steps, seed
        )
        result.fidelity = judge(result.images, specs)
        result.loss_right, result.loss_shuffled = swapped_input_loss(model, specs, scenes, seed)
    else:
        result.fidelity, result.images = prompt_fidelity(model, specs, sample_steps, seed)
        result.loss_right, result.loss_shuffled = shuffled_loss_ratio(model, specs, scenes, seed)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m avr.research.ladder`: train one rung, print what it measured (the headline
    last)."""
    from PIL import Image

    from avr.backbone.io import from_pretrained, save_pretrained

    parser = argparse.ArgumentParser(
        prog="avr ladder",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rung", type=int, default=3, choices=sorted(RUNGS), help="the task")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="trajectories per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--n", type=int, default=256, help="new prompts judged (at most 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=JSON",
        help="a UnifiedConfig field, e.g. timestep_shift=3",
    )
    parser.add_argument("--from", dest="start", metavar="DIR", help="start from an exported model")
    parser.add_argument("--out", metavar="PNG", help="save the judged samples as a grid")
    parser.add_argument(
        "--save", metavar="DIR", help="save the trained model (avr.export's format)"
    )
    args = parser.parse_args(argv)
    console = Console()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=JSON, e.g. timestep_shift=3")
        overrides[key] = json.loads(value)
    config = UnifiedConfig.from_dict(overrides) if overrides and not args.start else None
    start = from_pretrained(args.start, **overrides) if args.start else None
    console.print(
        f"rung {args.rung}: {RUNGS[args.rung].name}; from {args.start or 'random init'}; "
        f"config overrides {overrides or 'none'}; {describe()}"
    )
    result = climb(
        args.rung,
        args.steps,
        args.batch,
        args.lr,
        config=config,
        seed=args.seed,
        eval_prompts=min(args.n, 256),
        model=start,
        log=console.print,
    )
    if args.out:
        images = result.images[: 8 * (len(result.images) // 8) or len(result.images)]
        rows = [np.concatenate(list(images[i : i + 8]), 1) for i in range(0, len(images), 8)]
        Image.fromarray(np.concatenate(rows, 0)).save(args.out)
        console.print(f"samples: {args.out}")
    if args.save:
        console.print(f"model: {save_pretrained(result.model, args.save)}")
    console.print(headline(result, args.batch))
    return 0


def headline(result: ClimbResult, batch: int) -> str:
    f = result.fidelity
    return (
        f"ladder rung {result.rung}, {result.steps} steps x {batch} in {result.seconds:.0f} s: "
        f"colour precision {f['colour_precision']:.0%}, shape precision {f['shape_precision']:.0%}, "
        f"{f['objects_per_image']:.2f} objects/image (asked {f['asked_per_image']:.2f}), "
        f"exact {f['exact']:.0%}, accuracy {f['accuracy']:.0%}, "
        f"loss shuffled/right {result.loss_shuffled / result.loss_right:.2f}"
        + (
            f", copy error {result.copy_own:.3f} (to another input {result.copy_other:.3f})"
            if RUNGS[result.rung].reads
            else ""
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
