"""The embedded default: a tiny unified model with a tokenizer trained on ShapeWorld text.

This is the one place where the world meets the backbone (the backbone knows no world).
"""

from __future__ import annotations

import torch

from avr.backbone.config import UnifiedConfig
from avr.backbone.model import UnifiedModel
from avr.backbone.tokenizer import DEFAULT_MODES, train_tokenizer
from avr.world.prompts import corpus


def shapeworld_tokenizer(vocab_size: int = 512, modes=DEFAULT_MODES):
    """Byte-level BPE trained on ShapeWorld's corpus (same arguments, same tokenizer)."""
    return train_tokenizer(corpus(), vocab_size=vocab_size, modes=modes)


def tiny_model(seed: int = 0, config: UnifiedConfig | None = None) -> UnifiedModel:
    """A randomly initialised tiny model on ShapeWorld, the same for the same `seed` and config."""
    config = config or UnifiedConfig()
    tokenizer = shapeworld_tokenizer(modes=config.modes)
    torch.manual_seed(seed)
    return UnifiedModel(config, tokenizer)


def tiny_janus(seed: int = 0):
    """A randomly initialised tiny `JanusBackbone` (64 px) on the ShapeWorld tokenizer, the same for
    the same `seed`: the discrete-token backbone, as small as `tiny_model`, for tests."""
    from transformers import JanusForConditionalGeneration

    from avr.backbone.janus import JanusBackbone, JanusSettings, tiny_janus_config

    tokenizer = shapeworld_tokenizer()
    torch.manual_seed(seed)
    janus = JanusForConditionalGeneration(tiny_janus_config(len(tokenizer)))
    return JanusBackbone(janus, tokenizer, JanusSettings(image_size=64)).eval()
