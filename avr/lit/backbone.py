"""What the SFT and RL modules share: building the backbone, the optimizer, checkpoint contents.

Checkpoints hold only tensors and plain values (the backbone's config and tokenizer as JSON), so
they load with `torch.load(weights_only=True)`; Lightning writes them atomically (an fsspec
transaction: a temporary file moved into place).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from avr.backbone import UnifiedConfig, UnifiedModel, from_pretrained
from avr.backbone.io import portable_config
from avr.defaults import tiny_model

CHECKPOINT_KEY = "avr_backbone"


def build_backbone(path: str | None, seed: int) -> UnifiedModel:
    """The exported model at `path`, or (None) the tiny ShapeWorld model seeded with `seed`."""
    if path is None:
        return tiny_model(seed)
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model: {path} is not a folder written by save_pretrained / avr.export"
        )
    return from_pretrained(path)


class BackboneModule(L.LightningModule):
    """Base of `SFTModule` and `RLModule`: owns `self.backbone`, AdamW with warmup + cosine."""

    def __init__(
        self,
        model: str | None,
        seed: int,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        min_lr_ratio: float,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(model, seed)
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio

    def configure_optimizers(self):
        decay = [p for n, p in self.backbone.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [
            p for n, p in self.backbone.named_parameters() if p.requires_grad and p.ndim < 2
        ]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
        )
        total = (
            max(self.trainer.max_steps, self.warmup_steps + 1)
            if self.trainer.max_steps > 0
            else 10_000
        )
        # Cosine from lr to min_lr_ratio·lr: transformers' schedule ends at 0, so stretch its length.
        cosine_steps = total + int(
            (total - self.warmup_steps) * self.min_lr_ratio / max(1e-8, 1 - self.min_lr_ratio)
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, cosine_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": json.dumps(portable_config(self.backbone)),
            "tokenizer": self.backbone.tokenizer.backend_tokenizer.to_str(),
            "special": json.dumps(self.backbone.tokenizer.special_tokens_map),
        }


def backbone_from_checkpoint(path: str | Path, prefix: str = "backbone.") -> UnifiedModel:
    """Rebuild the backbone saved in a Lightning checkpoint (weights only, no pickle)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path}: not an avr checkpoint (no {CHECKPOINT_KEY!r} entry)")
    saved = checkpoint[CHECKPOINT_KEY]
    config = UnifiedConfig.from_dict(json.loads(saved["config"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(saved["tokenizer"]), **json.loads(saved["special"])
    )
    model = UnifiedModel(config, tokenizer)
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state, strict=True)
    return model
