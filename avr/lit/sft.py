"""`SFTModule`: supervised fine-tuning on interleaved teacher trajectories.

    loss = λ_CE · CE(text the model writes, <img>/</img>, <eos>) + MSE(predicted − true velocity)

on packed batches from `TrajectoryDataModule` (the module hands the data its packer). A
discrete-token backbone (Janus) takes the trajectories themselves and replaces the MSE with the
cross-entropy of its image tokens (`JanusBackbone.sft_loss`).
"""

from __future__ import annotations

import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from avr.backbone.packing import PackedBatch
from avr.lit.base import BackboneModule, ModelSettings


class SFTModule(BackboneModule):
    """Supervised fine-tuning of the unified model."""

    def __init__(
        self,
        model: ModelSettings | None = None,
        seed: int = 0,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        max_len: int = 1024,
        ema_decay: float | None = None,
    ) -> None:
        """
        Args:
            model: the model to train (folder, config overrides, LoRA, activation checkpointing);
                None: the tiny ShapeWorld model at random init from `seed`.
            seed: seeds a random-init model.
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay of matrices.
            warmup_steps: linear warmup steps.
            min_lr_ratio: the cosine ends at `min_lr_ratio · lr`.
            max_len: packed row length (tokens); a longer trajectory is an error.
            ema_decay: keep an exponential moving average of the weights (exported instead of
                the raw ones) when set, e.g. 0.999.
        """
        super().__init__(
            model,
            seed,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.max_len = max_len
        self.ema = (
            AveragedModel(
                self.backbone, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
            )
            if ema_decay
            else None
        )
        self._step_start = 0.0

    @property
    def packer(self):
        """How trajectories become batches for this backbone (`Backbone.packer`; None: the
        backbone takes the list of trajectories itself)."""
        return self.backbone.packer(self.max_len)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "packer"):
            datamodule.packer = self.packer

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: PackedBatch | list, batch_idx: int) -> torch.Tensor:
        loss, stats = self.backbone.sft_loss(batch)
        self._tokens = int(stats["tokens"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss/text", stats["loss/text"])
        self.log("train/loss/image", stats["loss/image"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        self.log("train/tokens_per_s", self._tokens / max(seconds, 1e-9), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.ema is not None:
            self.ema.update_parameters(self.backbone)

    def exported_backbone(self):
        """The weights to export: the EMA when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.backbone
