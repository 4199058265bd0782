"""A model folder's files: writing one atomically and reading its parts back.

```
DIR/config.json          UnifiedConfig (the language core's full config inlined under "lm")
DIR/model.safetensors    every weight, loaded strictly (a missing or unexpected key is an error)
DIR/tokenizer/           the tokenizer, saved by transformers
```

Writes go to a temporary folder beside `DIR` that replaces it in one rename, so a crash never leaves
a half-written model. Reading never unpickles anything. Which loader a folder needs (this layout,
BAGEL's, Janus') is `avr.backbone.io.from_pretrained`'s choice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerFast

from avr.backbone.config import UnifiedConfig
from avr.outputs import check_only_written, publish, staging_dir

if TYPE_CHECKING:
    from avr.backbone.model import UnifiedModel

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer"
#: What `save_pretrained` writes into its folder, and the model cards it keeps there.
WRITTEN = (CONFIG, WEIGHTS, TOKENIZER)
#: Files of a model folder that are not the model: its card, its recipe, its sampler settings
#: (`avr.cards`). A new save into the folder keeps them.
GENERATION_CONFIG = "generation_config.json"
CARDS = ("README.md", "RECIPE.md", GENERATION_CONFIG)


def portable_config(model: UnifiedModel) -> dict:
    """`model`'s config with the LM's (and VAE's) full configs inlined instead of paths: with the
    weights, everything needed to rebuild it."""
    config = model.config.to_dict()
    config["lm"] = {**model.lm.config.to_diff_dict(), "model_type": model.lm.config.model_type}
    config["lm_path"] = None
    if config["codec"] == "vae":
        config["vae"], config["vae_path"] = dict(model.codec.vae.config), None
    return config


def save_pretrained(model: UnifiedModel, directory: str | os.PathLike) -> Path:
    """Write `model` to `directory` atomically; returns the path. An existing `directory` is
    replaced only when it holds an earlier save (`config.json`, the weights, the tokenizer) and at
    most its model card (`README.md`, `RECIPE.md`, carried over into the new save); a folder
    holding anything else (a run's checkpoints, say) is refused, untouched."""
    directory = Path(directory)
    check_only_written(directory, (*WRITTEN, *CARDS), "a model save")
    config = portable_config(model)
    tmp = staging_dir(directory)
    try:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        save_model(model, str(tmp / WEIGHTS))
        model.tokenizer.save_pretrained(tmp / TOKENIZER)
        for card in CARDS:
            if (directory / card).is_file():
                shutil.copy2(directory / card, tmp / card)
        _readable(tmp)
        publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _readable(root: Path) -> None:
    """Give the folder the permissions a normal save would (`mkdtemp` makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def read_config(directory: str | os.PathLike, **overrides: Any) -> UnifiedConfig:
    """The `UnifiedConfig` of a `save_pretrained` folder (with `overrides`), no weight read."""
    path = Path(directory) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object of config keys, got {type(data).__name__}"
        )
    try:
        return UnifiedConfig.from_dict({**data, **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def read_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The tokenizer a `save_pretrained` folder holds; a missing or unreadable `tokenizer.json`
    is a `ValueError` naming it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every model folder holds its tokenizer)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except (ValueError, OSError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable `tokenizers` file ({first})") from None


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.float32` from "float32" (or a dtype); anything but a floating dtype is an error."""
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype: expected a floating torch dtype such as 'float32' or 'bfloat16', got {dtype!r}"
        )
    return value


def load_weights(model: torch.nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """`model`'s weights from the safetensors file `path`, strictly; a damaged file or weights of
    other shapes than the config's are a `ValueError` naming the file and the first bad key."""
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a complete safetensors file ({err})") from None
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"{path}: the weights do not fit {path.parent / CONFIG}: "
            f"{problems[0] if problems else err}{more}"
        ) from None
