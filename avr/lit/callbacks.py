"""Training callbacks: sampled trajectories as an image grid, the generator's prompt use, and how
well the model reads its own work.

`TrajectoryGrid`: every N steps, roll out a few fixed prompts and log their images as a grid.

Each row is one trajectory: its images in order (drafts, sketches, refined, final) and its text
beside them, so a run shows what the model plans and fixes, not only where it ends.
`PromptUse`: how much the image generator follows its prompt. `SelfUnderstanding`: critique
agreement with the verifier on the model's own images, plan steps, refines. `StepProgressBar`: a
progress bar that counts steps for runs without epochs. `Preemption`: SIGTERM or SIGINT saves a
resumable checkpoint and exits non-zero.
"""

from __future__ import annotations

import signal
import textwrap
import threading

import lightning as L
import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from avr.policy import SamplingConfig
from avr.registry import MODES
from avr.rollout import Job, rollout, rollout_seed
from avr.world import Verifier, sample_scene, sample_specs


class TrajectoryGrid(L.Callback):
    """Every `every_n_steps` steps, roll out a few fixed prompts and log them to every logger that
    takes images (TensorBoard): `samples/trajectories`, one row per trajectory with its images in
    order (upscaled `scale` times, nearest neighbour) and its text (prompt, chosen mode, plan,
    critiques) beside them; `samples/text`, the same text as a markdown table."""

    def __init__(
        self,
        every_n_steps: int = 250,
        prompts: int = 4,
        mode: str = "adaptive",
        seed: int = 0,
        steps: int = 25,
        scale: int = 3,
        max_text_tokens: int = 96,
    ) -> None:
        """`prompts`: how many fixed ShapeWorld prompts (drawn once from `seed`); `mode`: the
        registered mode to roll out with; `steps`: denoising steps (ODE); `scale`: upscaling;
        `max_text_tokens`: the cap on each text segment (greedy decoding)."""
        if scale < 1:
            raise ValueError(f"TrajectoryGrid: scale must be ≥ 1, got {scale}")
        self.every_n_steps, self.mode, self.seed, self.scale = every_n_steps, mode, seed, scale
        self.specs = sample_specs(prompts, seed=seed)
        self.sampling = SamplingConfig(
            steps=steps, temperature=0.0, max_text_tokens=max_text_tokens
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        step = trainer.global_step
        grid, texts = self.grid(module.backbone)
        table = "| prompt | trajectory |\n|---|---|\n" + "\n".join(
            f"| {spec.prompt} | {_markdown_cell(text)} |"
            for spec, text in zip(self.specs, texts, strict=True)
        )
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/trajectories", grid, step, dataformats="HWC")
                experiment.add_text("samples/text", table, step)

    @torch.no_grad()
    def grid(self, backbone) -> tuple[np.ndarray, list[str]]:
        """The grid `[rows·H, W, 3]` (uint8, one row per prompt: its images, then a panel with its
        text) and each row's text (`prompt → mode`, then every generated text segment)."""
        was_training = backbone.training
        backbone.eval()
        mode = MODES.get(self.mode)()
        rows, texts = [], []
        jobs = [Job(mode, spec, rollout_seed(self.seed, i)) for i, spec in enumerate(self.specs)]
        for spec, trajectory in zip(
            self.specs, rollout(backbone, jobs, self.sampling), strict=True
        ):
            rows.append([np.asarray(s.image) for s in trajectory.images])
            written = [s.text.strip() for s in trajectory.segments[1:] if s.text]
            texts.append("\n".join([f"{spec.prompt} → {trajectory.meta['mode']}", *written]))
        backbone.train(was_training)
        side = backbone.config.image_size * self.scale
        width = max(1, max(len(r) for r in rows))
        canvas = np.full((len(rows), width, side, side, 3), 255, dtype=np.uint8)
        for r, images in enumerate(rows):
            for c, image in enumerate(images):
                canvas[r, c] = image.repeat(self.scale, 0).repeat(self.scale, 1)
        images = rearrange(canvas, "r c h w k -> r h (c w) k")
        panels = [_text_panel(text, side, 2 * side) for text in texts]
        return np.concatenate(
            [np.concatenate(p, 1) for p in zip(images, panels, strict=True)]
        ), texts


def _due(trainer: L.Trainer, every_n_steps: int) -> bool:
    """Whether a measuring callback runs at this step: every `every_n_steps` (0: never), on rank 0."""
    step = trainer.global_step
    return bool(every_n_steps) and step % every_n_steps == 0 and trainer.is_global_zero


def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Straight to the loggers: one row at this step only."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, trainer.global_step)


def _text_panel(text: str, height: int, width: int) -> np.ndarray:
    """`text` wrapped onto a white `height × width` panel with a grey left rule (PIL's built-in
    font, so nothing is downloaded); lines that do not fit end in "…"."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    draw.line([(0, 0), (0, height)], fill=(200, 200, 200), width=2)
    chars = max(8, (width - 12) // 6)
    text = "".join(c if c.isprintable() or c == "\n" else "·" for c in text.replace("→", "->"))
    lines = [w for line in text.splitlines() for w in (textwrap.wrap(line, chars) or [""])]
    fit = max(1, (height - 8) // 12)
    if len(lines) > fit:
        lines = [*lines[: fit - 1], "…"]
    for n, line in enumerate(lines):
        draw.text((8, 4 + 12 * n), line, fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


class StepProgressBar(RichProgressBar):
    """Rich progress bar that says `step n/max_steps` for a run bounded by steps (RL's prompt
    stream has no epochs; Lightning's own bar says "Epoch 0/-2" there). The metrics logged with
    `prog_bar=True` (RL's reward, SFT's loss) show beside it."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0 and (trainer.max_epochs or -1) < 0:
            return "steps"
        return super()._get_train_description(current_epoch)


class PromptUse(L.Callback):
    """Every `every_n_steps`, how much the image generator follows its prompt, logged as
    `val/prompt_use/<ratio>`: colour and shape precision, objects and extra objects per image,
    exact scenes and accuracy of direct samples (ODE, `steps`) for `prompts` fixed held-out
    prompts, `val/prompt_use/shuffled_loss_ratio` (image loss with shuffled over right
    prompts; 1 means the prompt is ignored) and `val/prompt_use/context_loss_ratio` (a refined
    image's loss after another trajectory's draft over the loss after its own; 1 means the model
    does not edit its draft, see `avr.conditioning.context_loss_ratio`)."""

    def __init__(
        self, every_n_steps: int = 250, prompts: int = 48, steps: int = 10, seed: int = 0
    ) -> None:
        self.every_n_steps, self.steps, self.seed = every_n_steps, steps, seed
        tags = ("single_object", "two_object", "colors", "counting", "position", "color_attr")
        self.specs = sample_specs(prompts, tags, seed=seed, split="heldout")
        self.scenes = [
            sample_scene(s, np.random.default_rng([seed, i])) for i, s in enumerate(self.specs)
        ]

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        measured = self.measure(module.backbone)  # the trained weights, not an EMA
        _log(trainer, {f"val/prompt_use/{name}": value for name, value in measured.items()})

    def measure(self, backbone) -> dict[str, float]:
        """The ratios for `backbone`: the direct samples' for any backbone (they roll out through
        `avr.rollout`); the two loss ratios for a `UnifiedModel` only (they are flow losses; a
        warning says so the first time)."""
        from avr.backbone import UnifiedModel
        from avr.conditioning import context_loss_ratio, prompt_fidelity, shuffled_loss_ratio

        summary, _ = prompt_fidelity(backbone, self.specs, self.steps, self.seed)
        if isinstance(backbone, UnifiedModel):
            right, shuffled = shuffled_loss_ratio(backbone, self.specs, self.scenes, self.seed)
            summary["shuffled_loss_ratio"] = shuffled / right
            own, other = context_loss_ratio(backbone, self.specs, self.scenes, self.seed)
            summary["context_loss_ratio"] = other / own
        else:
            rank_zero_warn(
                "PromptUse measures the flow-loss ratios of unified models only, not "
                f"{type(backbone).__name__}: logging the direct samples' figures alone"
            )
        return {k: v for k, v in summary.items() if v == v}  # NaN: nothing to count


class SelfUnderstanding(L.Callback):
    """Every `every_n_steps`, how well the model reads its own work, logged as
    `val/understanding/<name>`: `reflect` and `plan` rolled out (greedy text, ODE with `steps`) on
    `prompts` fixed held-out prompts of every level, scored by `avr.understanding.Understanding`:
    critique agreement with the verifier on the model's own images, balanced accuracy, false
    alarms and misses, first critiques apart, plan steps equal to the teacher's, refine fix and
    break rates, and the final images' accuracy per mode."""

    def __init__(
        self, every_n_steps: int = 250, prompts: int = 48, steps: int = 10, seed: int = 0
    ) -> None:
        self.every_n_steps, self.steps, self.seed = every_n_steps, steps, seed
        self.specs = sample_specs(prompts, seed=seed, split="heldout")

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        measured = self.measure(module.backbone)
        _log(trainer, {f"val/understanding/{k}": v for k, v in measured.items()})

    def measure(self, backbone) -> dict[str, float]:
        """The figures for `backbone` (in eval mode while measured, then restored)."""
        from avr.understanding import Understanding

        was_training = backbone.training
        backbone.eval()
        sampling = SamplingConfig(steps=self.steps, temperature=0.0, max_text_tokens=96)
        understanding, verifier, out = Understanding(), Verifier(), {}
        try:
            for mode in ("reflect", "plan"):
                jobs = [
                    Job(MODES.get(mode)(), s, rollout_seed(self.seed, i))
                    for i, s in enumerate(self.specs)
                ]
                trajectories = rollout(backbone, jobs, sampling)
                right = 0
                for spec, trajectory in zip(self.specs, trajectories, strict=True):
                    understanding.update(trajectory, spec)
                    final = trajectory.final_image
                    right += final is not None and verifier.verify(final, spec).correct
                out[f"{mode}_accuracy"] = right / len(self.specs)
        finally:
            backbone.train(was_training)
        summary = understanding.summary()
        critique = summary["critique"]
        out.update(
            critique_agreement=critique["agreement"],
            critique_balanced_accuracy=critique["balanced_accuracy"],
            false_alarm_rate=critique["false_alarm_rate"],
            miss_rate=critique["miss_rate"],
            first_critique_agreement=critique["by_round"].get("first", {}).get("agreement"),
            plan_step_accuracy=summary["plan_steps"]["accuracy"],
            description_accuracy=summary["descriptions"]["accuracy"],
            refine_fix_rate=summary["refines"]["fix_rate"],
        )
        return {k: float(v) for k, v in out.items() if v is not None}


class Preemption(L.Callback):
    """SIGTERM (a scheduler preempting the job) or SIGINT (Ctrl-C) during training: the step under
    way finishes, a resumable checkpoint `preempted.ckpt` is saved where the run keeps its
    checkpoints, where it went is printed, and `avr fit` exits with 128 + the signal's number (143
    for SIGTERM, 130 for SIGINT) instead of 0, so `fit && export` stops. A second Ctrl-C stops at
    once (Lightning's KeyboardInterrupt path). `avr.fit` adds this callback to every run.

    The signal only raises Lightning's own flag (`trainer.received_sigterm`, which every rank
    learns through its broadcast); Lightning ends the loop after the step and every rank saves
    the checkpoint together, the way it saves a scheduled one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.saved: str | None = None
        self._previous: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread (a notebook's worker: none)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._receive)

    def _receive(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        lightning = self._previous.get(signal.SIGTERM)
        if callable(lightning):  # Lightning's SIGTERM handler: sets and broadcasts its flag
            lightning(signal.SIGTERM, frame)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if callback is not None and callback.dirpath else None
        folder = folder or f"{trainer.default_root_dir}/checkpoints"
        self.saved = f"{folder}/preempted.ckpt"
        trainer.save_checkpoint(self.saved, weights_only=False)  # every rank: a collective
        if trainer.is_global_zero:
            name = signal.Signals(self.received or signal.SIGTERM).name
            Console(stderr=True).print(
                f"{name}: stopped after step {trainer.global_step}; resumable checkpoint "
                f"{self.saved}\nresume with the same command and --ckpt_path {self.saved}",
                highlight=False,
                soft_wrap=True,
            )
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
