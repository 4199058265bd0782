"""The unified backbone: one transformer that reads and writes text and images.

It knows no mode, no world and no trainer.
"""

from avr.backbone.config import UnifiedConfig
from avr.backbone.generation import ImageSample, Session, TextSample
from avr.backbone.io import from_pretrained, save_pretrained
from avr.backbone.loss import UnifiedLoss
from avr.backbone.model import KVCache, UnifiedModel, UnifiedOutput
from avr.backbone.packing import FlowSettings, ImageGeometry, PackedBatch, pack
from avr.backbone.tokenizer import add_special_tokens, mode_token, train_tokenizer

__all__ = [
    "FlowSettings",
    "ImageGeometry",
    "ImageSample",
    "KVCache",
    "PackedBatch",
    "Session",
    "TextSample",
    "UnifiedConfig",
    "UnifiedLoss",
    "UnifiedModel",
    "UnifiedOutput",
    "add_special_tokens",
    "from_pretrained",
    "mode_token",
    "pack",
    "save_pretrained",
    "train_tokenizer",
]
