"""`SFTModule`: supervised fine-tuning on interleaved teacher trajectories.

    loss = λ_CE · CE(text the model writes, <img>/</img>, <eos>) + MSE(predicted − true velocity)

on packed batches from `TrajectoryDataModule` (the module hands the data its packer). A
discrete-token backbone (Janus) takes the trajectories themselves and replaces the MSE with the
cross-entropy of its image tokens (`JanusBackbone.sft_loss`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from avr.backbone.lora import LoraSettings
from avr.backbone.packing import PackedBatch
from avr.lit.base import BackboneModule


class SFTModule(BackboneModule):
    """Supervised fine-tuning of the unified model."""

    def __init__(
        self,
        model: str | None = None,
        seed: int = 0,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        max_len: int = 1024,
        ema_decay: float | None = None,
        model_overrides: dict[str, Any] | None = None,
        lora: LoraSettings | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        """`model`: an exported model folder to start from (None: the tiny ShapeWorld model, random
        init from `seed`); `max_len`: packed row length; `ema_decay`: keep an exponential moving
        average of the weights (exported instead of the raw ones) when set, e.g. 0.999;
        `model_overrides`: `UnifiedConfig` fields on top of the loaded model's (e.g. `image_size`
        of a BAGEL checkpoint); `lora`: train LoRA adapters (peft) instead of every weight;
        `activation_checkpointing`: recompute decoder layers in the backward pass."""
        super().__init__(
            model,
            seed,
            lr,
            weight_decay,
            warmup_steps,
            min_lr_ratio,
            model_overrides,
            lora,
            activation_checkpointing,
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
