"""`from_pretrained`: a model from its folder (`avr.backbone.files` writes and reads the parts), a
shipped name or a Hub id in the local cache. `save_pretrained` is `avr.backbone.files`'.

`from_pretrained` also reads BAGEL's published layout (`ema.safetensors`, `ae.safetensors`,
`llm_config.json`, `vit_config.json`; see `avr.backbone.bagel`).
Loading never unpickles anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from avr.backbone.bagel import from_bagel, is_bagel_dir
from avr.backbone.files import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    as_dtype,
    load_weights,
    read_config,
    read_tokenizer,
    save_pretrained,
)
from avr.backbone.model import UnifiedModel
from avr.backbone.protocol import Backbone, folder_reader

__all__ = ["SHIPPED", "from_pretrained", "resolve_model_dir", "save_pretrained"]


def from_pretrained(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    **overrides: Any,
) -> Backbone:
    """Load a model written by `save_pretrained`, a checkpoint in BAGEL's published layout (see
    `avr.backbone.bagel`), or a folder a registered backbone class reads (`reads_folder`: a
    transformers Janus folder gives a `JanusBackbone`, see `avr.backbone.janus`), strictly and without pickle. `overrides` replace `UnifiedConfig`
    fields that leave the weights' shapes alone (`image_size` of a BAGEL model, `attention`,
    `max_seq_len` …); one that changes a shape fails the strict load, naming the key. The whole
    model is in `dtype` (float32 default; "bfloat16" where asked), whatever the folder's config
    files say (a Qwen2 `config.json` says bfloat16)."""
    directory = resolve_model_dir(directory)
    dtype = as_dtype(dtype)
    if is_bagel_dir(directory):
        return from_bagel(directory, device=device, dtype=dtype, **overrides)
    reader = folder_reader(directory)
    if reader is not None:  # Janus, a user's backbone: the class that says it reads the folder
        return reader.from_pretrained(directory, device=device, **overrides)
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: missing (not a save_pretrained folder?)")
    config = read_config(directory, **overrides)
    tokenizer = read_tokenizer(directory / TOKENIZER)
    model = UnifiedModel(config, tokenizer)
    load_weights(model, directory / WEIGHTS, device)
    return model.to(device, dtype)


#: The models shipped with the repository (`checkpoints/` beside the `avr` package).
SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else, for a bare name such as `shapeworld-tiny-sft`, the
    shipped model of that name (`checkpoints/NAME` of the repository), so a shipped model loads by
    its name from any working directory; else, for a Hub id `ORG/NAME`, its snapshot in the local
    Hugging Face cache where one is there (never downloaded: nothing here uses the network)."""
    given = Path(path)
    if given.exists():
        return given
    shipped = SHIPPED / given.name
    if len(given.parts) == 1 and (shipped / CONFIG).is_file():
        return shipped
    if len(given.parts) == 2 and not str(path).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            pass  # not in the cache: the caller names the missing folder
    return given
