"""LoRA on the unified model's decoder layers, through `peft`.

`add_lora` puts peft's LoRA layers on the chosen linear layers of the language core and of the
generation expert, and freezes everything else but the modules named in `trainable` (by default
the small generation heads, which a new task needs to move). `merge_lora` folds the adapters back
into plain linear layers, so an exported model has the ordinary layout. `adapters_disabled` runs
the model as it was before training, which is the RL reference when only adapters train.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# Decoder layers of the language core, and their generation-expert twins
_DECODER = r"(lm\.model\.layers|gen_layers)\.\d+\.(self_attn|mlp)"


@dataclass
class LoraSettings:
    """Which layers get adapters, their rank, and what else trains."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scale numerator: the adapter's update is multiplied by `alpha / r`."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Names of the decoder layers' linear modules that get adapters (expert twins included)."""
    trainable: tuple[str, ...] = ("latent_in", "velocity_out", "time_embed")
    """Modules trained in full besides the adapters (prefixes of parameter names)."""

    def __post_init__(self) -> None:
        self.target_modules, self.trainable = tuple(self.target_modules), tuple(self.trainable)
        if self.r < 1:
            raise ValueError(f"lora key 'r': expected a rank ≥ 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("lora key 'target_modules': expected at least one module name")


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject adapters into `model` in place and freeze what neither the adapters nor
    `settings.trainable` cover. Raises if no module matches `target_modules`."""
    names = "|".join(re.escape(name) for name in settings.target_modules)
    pattern = rf"^{_DECODER}\.({names})$"
    if not any(re.match(pattern, name) for name, _ in model.named_modules()):
        raise ValueError(
            f"lora key 'target_modules': none of {list(settings.target_modules)} is a linear "
            "layer of the decoder"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
    )
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith(settings.trainable))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """The adapter-carrying modules of `model`, by name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back, in place."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` without its adapters inside the block (the base weights as loaded)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
