"""What the SFT and RL modules share: building the backbone, the optimizer, checkpoint contents.

Checkpoints hold only tensors and plain values (the backbone's config and tokenizer as JSON), so
they load with `torch.load(weights_only=True)`; Lightning writes them atomically (an fsspec
transaction: a temporary file moved into place).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from transformers import (
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from avr.backbone import UnifiedConfig, from_pretrained
from avr.backbone.io import resolve_model_dir
from avr.backbone.lora import LoraSettings, add_lora, merge_lora
from avr.backbone.protocol import Backbone, backbone_class
from avr.data.datamodule import ResumeError
from avr.defaults import tiny_model

CHECKPOINT_KEY = "avr_backbone"


def build_backbone(
    path: str | None, seed: int, overrides: dict[str, Any] | None = None
) -> Backbone:
    """The exported (BAGEL, Janus) model at `path`, or (None) the tiny ShapeWorld model seeded with
    `seed`; `overrides` are `UnifiedConfig` fields (see `from_pretrained`)."""
    if path is None:
        config = UnifiedConfig.from_dict(overrides) if overrides else None
        return tiny_model(seed, config)
    if Path(path).is_file() and path.endswith(".ckpt"):  # a fine-tune start from a run's weights
        if overrides:
            raise ValueError(f"model.overrides: not applied to a checkpoint ({path}); export it")
        return backbone_from_checkpoint(path, "auto")
    path = str(resolve_model_dir(path))
    if not Path(path).is_dir():
        where = (
            " (a random-init tiny model is `model: null`, on the command line "
            "`--model.init_args.model null`)"
            if path in ("None", "null")
            else ""
            if Path(path).is_absolute()
            else f" (a relative path is read from the working directory, {Path.cwd()}; the "
            "shipped configs name the repository's checkpoints/, so run them from its root or "
            "give an absolute path)"
        )
        raise FileNotFoundError(
            f"model.path: {path} is not a folder written by save_pretrained / avr.export, "
            f"nor a BAGEL or Janus checkpoint{where}"
        )
    return from_pretrained(path, **(overrides or {}))


@dataclasses.dataclass
class ModelSettings:
    """The model a run trains, as SFT and RL both take it (YAML key `model`, under `init_args`)."""

    path: str | None = None
    """An exported model folder (avr.export / save_pretrained), a BAGEL or a Janus checkpoint
    folder, or a run's Lightning checkpoint (`.ckpt`: its EMA weights when it keeps them, else
    the trained ones; a fine-tune start, where `--ckpt_path` would resume the run itself); None:
    the tiny ShapeWorld model at random init from the module's `seed`."""
    overrides: dict[str, Any] | None = None
    """`UnifiedConfig` fields on top of the loaded model's (e.g. `image_size` of a BAGEL
    checkpoint, `timestep_shift`)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (peft) instead of every weight; None: full fine-tuning."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (less memory, more compute)."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)


class BackboneModule(L.LightningModule):
    """Base of `SFTModule` and `RLModule`: owns `self.backbone`, AdamW with warmup + cosine."""

    def __init__(
        self,
        model: ModelSettings | None,
        seed: int,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        min_lr_ratio: float,
    ) -> None:
        super().__init__()
        for name, value, ok, expected in (
            ("lr", lr, lr > 0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, "≥ 0"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, "≥ 0"),
            ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
        ):
            if not ok:
                raise ValueError(f"model.{name}: expected {expected}, got {value}")
        settings = model or ModelSettings()
        self.backbone = build_backbone(settings.path, seed, settings.overrides)
        self.lora = settings.lora
        if self.lora is not None:
            add_lora(self.backbone, self.lora)
        self.backbone.activation_checkpointing = settings.activation_checkpointing
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

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log `train/grad_norm`: the total 2-norm of the gradients, before clipping."""
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        backbone = self.backbone
        checkpoint[CHECKPOINT_KEY] = {
            "module": type(self).__name__,
            "kind": backbone.kind,
            "config": json.dumps(backbone.checkpoint_config()),
            "lora": json.dumps(dataclasses.asdict(self.lora) if self.lora else None),
            "tokenizer": self.backbone.tokenizer.backend_tokenizer.to_str(),
            "special": json.dumps(self.backbone.tokenizer.special_tokens_map),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume (`--ckpt_path`) only a checkpoint of this module and this model; anything else
        is a `ResumeError` naming what differs (before Lightning loads a weight)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ResumeError(f"--ckpt_path: not an avr checkpoint (no {CHECKPOINT_KEY!r} entry)")
        this = type(self).__name__
        start = (
            "to start from its weights instead, give it as --model.init_args.model.path "
            "(a fine-tune start) and drop --ckpt_path"
        )
        if saved.get("module", this) != this:
            raise ResumeError(
                f"--ckpt_path: a {saved['module']} checkpoint cannot resume a {this} run; {start}"
            )
        ours = {"kind": self.backbone.kind, **self.backbone.checkpoint_config()}
        theirs = {"kind": saved.get("kind", "unified"), **json.loads(saved["config"])}
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            key = differ[0]
            raise ResumeError(
                f"--ckpt_path: the checkpoint's model differs from this run's ({key}: "
                f"{_short(theirs.get(key))} there, {_short(ours.get(key))} here"
                f"{f'; {len(differ) - 1} more' if len(differ) > 1 else ''}); {start}"
            )


def _short(value: Any, width: int = 60) -> str:
    """`value` as JSON, cut to `width` characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def backbone_from_checkpoint(path: str | Path, weights: str = "raw") -> Backbone:
    """Rebuild the backbone saved in a Lightning checkpoint (weights only, no pickle); LoRA
    adapters, when trained, are merged into the weights. `weights`: `raw` (the trained ones),
    `ema` (its EMA; an error when it keeps none) or `auto` (the EMA when kept)."""
    return load_checkpoint_backbone(path, weights)[0]


def load_checkpoint_backbone(
    path: str | Path, weights: str = "raw", info: dict | None = None
) -> tuple[Backbone, str]:
    """`backbone_from_checkpoint`, read once, with the state-dict prefix its weights came from
    (`ema.module.` or `backbone.`); `info`, where given, receives the checkpoint's `step` and its
    data module's state (`data`: the build id it trained on)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if info is not None:
        info.update(step=checkpoint.get("global_step"), data=checkpoint.get("TrajectoryDataModule"))
    if CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path}: not an avr checkpoint (no {CHECKPOINT_KEY!r} entry)")
    has_ema = any(k.startswith("ema.module.") for k in checkpoint["state_dict"])
    if weights == "ema" and not has_ema:
        raise ValueError("--weights ema: the checkpoint keeps no EMA (set ema_decay)")
    prefix = "ema.module." if has_ema and weights != "raw" else "backbone."
    saved = checkpoint[CHECKPOINT_KEY]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(saved["tokenizer"]), **json.loads(saved["special"])
    )
    model = backbone_class(saved.get("kind", "unified")).from_checkpoint_config(
        json.loads(saved["config"]), tokenizer
    )
    lora = json.loads(saved.get("lora", "null"))
    if lora is not None:
        add_lora(model, LoraSettings(**lora))
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state, strict=True)
    return (merge_lora(model) if lora is not None else model), prefix
