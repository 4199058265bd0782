"""`save_pretrained` / `from_pretrained`: safetensors weights, JSON config and the tokenizer.

```
DIR/config.json          UnifiedConfig (the language core's full config inlined under "lm")
DIR/model.safetensors    every weight, loaded strictly (a missing or unexpected key is an error)
DIR/tokenizer/           the tokenizer, saved by transformers
```

`from_pretrained` also reads BAGEL's published layout (`ema.safetensors`, `ae.safetensors`,
`llm_config.json`, `vit_config.json`; see `avr.backbone.bagel`).

Writes go to a temporary folder beside `DIR` that replaces it in one rename, so a crash never leaves
a half-written model. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerFast

from avr.backbone.bagel import from_bagel, is_bagel_dir
from avr.backbone.config import UnifiedConfig
from avr.backbone.janus import JanusBackbone, is_janus_dir
from avr.backbone.model import UnifiedModel
from avr.outputs import check_only_written, publish, staging_dir

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


def from_pretrained(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    **overrides: Any,
) -> UnifiedModel | JanusBackbone:
    """Load a model written by `save_pretrained`, a checkpoint in BAGEL's published layout (see
    `avr.backbone.bagel`) or a transformers Janus folder (a `JanusBackbone`, see
    `avr.backbone.janus`), strictly and without pickle. `overrides` replace `UnifiedConfig`
    fields that leave the weights' shapes alone (`image_size` of a BAGEL model, `attention`,
    `max_seq_len` …); one that changes a shape fails the strict load, naming the key. The whole
    model is in `dtype` (float32 default; "bfloat16" where asked), whatever the folder's config
    files say (a Qwen2 `config.json` says bfloat16)."""
    directory = resolve_model_dir(directory)
    dtype = as_dtype(dtype)
    if is_bagel_dir(directory):
        return from_bagel(directory, device=device, dtype=dtype, **overrides)
    if is_janus_dir(directory):
        return JanusBackbone.from_pretrained(directory, device=device, **overrides)
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name}: missing (not a save_pretrained folder?)")
    config = read_config(directory, **overrides)
    tokenizer = read_tokenizer(directory / TOKENIZER)
    model = UnifiedModel(config, tokenizer)
    load_weights(model, directory / WEIGHTS, device)
    return model.to(device, dtype)


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
