"""avr: unified multimodal models that generate images through adaptive interleaved reasoning."""

__version__ = "0.1.0"
