"""Model cards and generation settings of a model folder, in the Hugging Face layout.

- `README.md`: YAML front matter (`library_name`, `base_model`, `tags`, the training run, the
  evaluation with its intervals where measured) and a short body; `avr export` writes one from the
  run (its `config.yaml`, step count and data build), shipped models carry theirs, and a later
  export into the same folder keeps it (as `RECIPE.md`, the long recipe, is kept).
- `generation_config.json`: the sampler settings a card's figures used; `avr.Pipeline` and `avr
  generate` take them as their defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from avr.backbone.files import GENERATION_CONFIG

#: Every setting `generation_config.json` may hold, with the value used where it says nothing:
#: those of every documented result (ODE, 10 steps, greedy text, no guidance).
GENERATION_DEFAULTS: dict[str, Any] = {
    "mode": "adaptive",
    "num_inference_steps": 10,
    "guidance_scale": 1.0,
    "shift": 1.0,
    "temperature": 0.0,
    "max_text_tokens": 96,
}


def read_generation_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The defaults overlaid with `folder/generation_config.json` where there is one; a file that
    is not a JSON object, an unknown key or a value of the wrong type is an error naming both."""
    values = dict(GENERATION_DEFAULTS)
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return values
    try:
        read = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(read, dict):
        raise ValueError(f"{path}: expected a JSON object of sampler settings")
    for key, value in read.items():
        if key not in GENERATION_DEFAULTS:
            known = ", ".join(GENERATION_DEFAULTS)
            raise ValueError(f"{path}: unknown key {key!r}; expected some of {known}")
        wanted = type(GENERATION_DEFAULTS[key])
        ok = isinstance(value, wanted) or (wanted is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            kind = {int: "an integer", float: "a number", str: "a string"}[wanted]
            raise ValueError(f"{path}: {key} must be {kind}, got {value!r}")
        values[key] = wanted(value)
    return values


def write_generation_config(folder: str | os.PathLike, **settings: Any) -> Path:
    """Write `folder/generation_config.json`: the defaults with `settings` over them."""
    unknown = set(settings) - set(GENERATION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown sampler settings {sorted(unknown)}")
    path = Path(folder) / GENERATION_CONFIG
    values = {**GENERATION_DEFAULTS, **settings}
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return path


def card(meta: dict[str, Any], body: str) -> str:
    """A model card: `meta` as YAML front matter, then `body` (Markdown)."""
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    return f"---\n{front}---\n\n{body.strip()}\n"


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The front matter of a model card (an empty dict where it has none)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    front, _, _ = text[4:].partition("\n---\n")
    meta = yaml.safe_load(front)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its front matter is not a YAML mapping")
    return meta


def export_card(name: str, checkpoint: Path, weights: str, step: int, data: dict | None) -> str:
    """The card `avr export` writes for `checkpoint`: its run's settings (the `config.yaml`
    Lightning saved beside the run's checkpoints, where found), its step and its data build."""
    run = _run_config(checkpoint)
    init = (run.get("model") or {}).get("init_args") or {}
    model = init.get("model") or {}
    data_args = ((run.get("data") or {}).get("init_args")) or {}
    training = {
        "module": (run.get("model") or {}).get("class_path"),
        "checkpoint": str(checkpoint),
        "weights": weights,
        "step": step,
        "lr": init.get("lr"),
        "max_steps": (run.get("trainer") or {}).get("max_steps"),
        "data": data_args.get("path"),
        "data_build": (data or {}).get("build_id"),
    }
    meta = {
        "library_name": "avr",
        "pipeline_tag": "text-to-image",
        "tags": ["avr", "unified-multimodal", "interleaved-reasoning"],
        "base_model": model.get("path"),
        "training": {k: v for k, v in training.items() if v is not None},
        "generation": dict(GENERATION_DEFAULTS),
    }
    body = f"""
# {name}

Exported by `avr export` from `{checkpoint}` ({weights} weights, step {step}). Load it with
`avr.Pipeline.from_pretrained("{name}")` (or its path), or evaluate it with `avr evaluate --model
PATH`. Its figures are not measured yet: add them under `evaluation` in the front matter and here.
"""
    return card({k: v for k, v in meta.items() if v is not None}, body)


def _run_config(checkpoint: Path) -> dict:
    """The `config.yaml` of the run that wrote `checkpoint` (`<log dir>/checkpoints/x.ckpt`),
    or {} where there is none."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, dict) else {}
    return {}
