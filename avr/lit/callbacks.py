"""Training callbacks: sampled trajectories as an image grid, and the generator's prompt use.

`TrajectoryGrid`: every N steps, roll out a few fixed prompts and log their images as a grid.

Each row is one trajectory: its images in order (drafts, sketches, refined, final), so a run shows
what the model plans and fixes, not only where it ends. The prompts and modes are logged as text.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn

from avr.policy import PolicyActor, SamplingConfig
from avr.registry import MODES
from avr.world import sample_scene, sample_specs


class TrajectoryGrid(L.Callback):
    """Log a grid of sampled trajectories to TensorBoard every `every_n_steps` steps."""

    def __init__(
        self,
        every_n_steps: int = 250,
        prompts: int = 4,
        mode: str = "adaptive",
        seed: int = 0,
        steps: int = 25,
    ) -> None:
        """`prompts`: how many fixed ShapeWorld prompts (drawn once from `seed`); `mode`: the
        registered mode to roll out with; `steps`: denoising steps (ODE)."""
        self.every_n_steps, self.mode, self.seed = every_n_steps, mode, seed
        self.specs = sample_specs(prompts, seed=seed)
        self.sampling = SamplingConfig(steps=steps, temperature=0.0)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not trainer.is_global_zero:
            return
        grid, captions = self.grid(module.backbone)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/trajectories", grid, step, dataformats="HWC")
            experiment.add_text("samples/prompts", "\n\n".join(captions), step)

    @torch.no_grad()
    def grid(self, backbone) -> tuple[np.ndarray, list[str]]:
        """The grid `[rows·H, cols·W, 3]` (uint8, one row per prompt) and one caption per row."""
        was_training = backbone.training
        backbone.eval()
        mode = MODES.get(self.mode)()
        rows, captions = [], []
        for i, spec in enumerate(self.specs):
            actor = PolicyActor(
                backbone, self.sampling, torch.Generator().manual_seed(self.seed + i)
            )
            trajectory = mode.rollout(actor, spec)
            rows.append([np.asarray(s.image) for s in trajectory.images])
            captions.append(f"{spec.prompt} → {trajectory.meta['mode']}")
        backbone.train(was_training)
        side = backbone.config.image_size
        width = max(1, max(len(r) for r in rows))
        canvas = np.full((len(rows), width, side, side, 3), 255, dtype=np.uint8)
        for r, images in enumerate(rows):
            for c, image in enumerate(images):
                canvas[r, c] = image
        return rearrange(canvas, "r c h w k -> (r h) (c w) k"), captions


class PromptUse(L.Callback):
    """Every `every_n_steps`, how much the image generator follows its prompt, logged as
    `val/prompt_use/<ratio>`: colour and shape precision, objects and extra objects per image,
    exact scenes and accuracy of direct samples (ODE, `steps`) for `prompts` fixed held-out
    prompts, and `val/prompt_use/shuffled_loss_ratio` (image loss with shuffled over right
    prompts; 1 means the prompt is ignored)."""

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
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        if not trainer.is_global_zero:
            return
        measured = self.measure(module.backbone)  # the trained weights, not an EMA
        metrics = {f"val/prompt_use/{name}": value for name, value in measured.items()}
        for logger in trainer.loggers:  # straight to the loggers: one row at this step only
            logger.log_metrics(metrics, step)

    def measure(self, backbone) -> dict[str, float]:
        """The ratios for `backbone`; empty for a backbone that is not a `UnifiedModel` (the
        shuffled-prompt loss is a flow loss), with a warning the first time."""
        from avr.backbone import UnifiedModel
        from avr.conditioning import prompt_fidelity, shuffled_loss_ratio

        if not isinstance(backbone, UnifiedModel):
            rank_zero_warn(f"PromptUse measures unified models only, not {type(backbone).__name__}")
            return {}
        summary, _ = prompt_fidelity(backbone, self.specs, self.steps, self.seed)
        right, shuffled = shuffled_loss_ratio(backbone, self.specs, self.scenes, self.seed)
        summary["shuffled_loss_ratio"] = shuffled / right
        return {k: v for k, v in summary.items() if v == v}  # NaN: nothing to count
