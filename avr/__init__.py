"""avr: unified multimodal models that generate images through adaptive interleaved reasoning.

`avr.Pipeline` makes images with a trained model (`avr.pipeline`); the rest lives in its modules
(`avr.backbone`, `avr.rollout`, `avr.world`, `avr.lit`, …)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineOutput"]


def __getattr__(name: str):
    """`avr.Pipeline` is imported on first use, so `import avr.world` stays free of torch."""
    if name in __all__:
        from avr import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'avr' has no attribute {name!r}")
