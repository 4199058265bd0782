"""Read a checkpoint in BAGEL's published layout into a `UnifiedModel` of BAGEL's shape.

```
DIR/llm_config.json    Qwen2 config of the language core (BAGEL adds QK-norm and the MoT expert)
DIR/vit_config.json    SigLIP config; BAGEL's loaders drop its last layer (num_hidden_layers − 1)
DIR/ema.safetensors    every weight but the autoencoder's, under BAGEL's names (`BAGEL_NAMES`)
DIR/ae.safetensors     the FLUX autoencoder in its original (LDM) naming
DIR/tokenizer.json …   the tokenizer, read offline with `AutoTokenizer`
```

Every weight of the unified model has exactly one source: `bagel_name` turns our state-dict name
into BAGEL's, so a key of `ema.safetensors` that no weight asks for, or a weight whose key is
absent, is an error naming the key. The autoencoder goes through diffusers' own LDM converter,
and any `ae.safetensors` key the converter leaves unused is an error too.

One tensor changes form on the way in, exactly: SigLIP's patch embedding, a linear layer over
`(p, q, c)` patches in BAGEL and a convolution here. Latent tokens keep BAGEL's `(p, q, c)` value
order through `UnifiedConfig.latent_channels_last`, so `vae2llm`/`llm2vae` load as they are.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from avr.backbone.config import UnifiedConfig, flux_vae_config
from avr.backbone.model import UnifiedModel
from avr.backbone.tokenizer import DEFAULT_MODES, add_special_tokens

LLM_CONFIG, VIT_CONFIG, EMA, AE = (
    "llm_config.json",
    "vit_config.json",
    "ema.safetensors",
    "ae.safetensors",
)
PATCH_EMBEDDING = "vision.embeddings.patch_embedding.weight"

# Our state-dict name → BAGEL's, first match wins. The MoT expert's twins carry `_moe_gen`.
BAGEL_NAMES: tuple[tuple[str, str], ...] = (
    (
        r"^gen_layers\.(\d+)\.self_attn\.(\w+)\.",
        r"language_model.model.layers.\1.self_attn.\2_moe_gen.",
    ),
    (r"^gen_layers\.(\d+)\.(\w+)\.", r"language_model.model.layers.\1.\2_moe_gen."),
    (r"^gen_norm\.", "language_model.model.norm_moe_gen."),
    (r"^lm\.", "language_model."),
    (r"^vision\.", "vit_model.vision_model."),
    (r"^connector\.0\.", "connector.fc1."),
    (r"^connector\.2\.", "connector.fc2."),
    (r"^vision_pos_embed\.", "vit_pos_embed."),
    (r"^latent_pos_embed\.", "latent_pos_embed."),
    (r"^time_embed\.linear_1\.", "time_embedder.mlp.0."),
    (r"^time_embed\.linear_2\.", "time_embedder.mlp.2."),
    (r"^latent_in\.", "vae2llm."),
    (r"^velocity_out\.", "llm2vae."),
)


def bagel_name(name: str) -> str:
    """BAGEL's key for our state-dict entry `name` (the autoencoder's `codec.vae.*` excepted)."""
    for pattern, replacement in BAGEL_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    raise ValueError(f"weight {name!r} has no place in BAGEL's layout (is the model BAGEL-shaped?)")


def is_bagel_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a BAGEL checkpoint (its config and EMA weights)."""
    return (Path(directory) / LLM_CONFIG).is_file() and (Path(directory) / EMA).is_file()


def from_bagel(
    directory: str | os.PathLike,
    modes: tuple[str, ...] = DEFAULT_MODES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> UnifiedModel:
    """Load a BAGEL checkpoint folder. `overrides` are `UnifiedConfig` fields on top of
    `UnifiedConfig.bagel_7b()` with the folder's own LM, SigLIP and autoencoder shapes (e.g.
    `image_size=1024`, `attention="flex"`). Every weight ends in `dtype`, whatever
    `llm_config.json`'s `torch_dtype` says."""
    directory = Path(directory)
    config, tokenizer = bagel_config(directory, modes, **overrides)
    with init_empty_weights(include_buffers=False):  # weights on meta: no random init, no copy
        model = UnifiedModel(config, tokenizer)
    _load_ema(model, directory / EMA)
    _load_ae(model, load_file(directory / AE), config.vae, directory / AE)
    unloaded = [name for name, param in model.named_parameters() if param.is_meta]
    if unloaded:  # every weight has a source key, so this means a bug in the map
        raise ValueError(f"{directory}: no weight loaded for {unloaded[:5]}")
    return model.to(device, dtype)


def bagel_config(
    directory: str | os.PathLike, modes: tuple[str, ...] = DEFAULT_MODES, **overrides: Any
) -> tuple[UnifiedConfig, PreTrainedTokenizerBase]:
    """The `UnifiedConfig` and tokenizer of a BAGEL checkpoint folder, read from its config files,
    the shapes of its weights and its tokenizer (no weight is loaded)."""
    directory = Path(directory)
    for name in (LLM_CONFIG, VIT_CONFIG, EMA, AE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing (not a BAGEL checkpoint folder?)")
    lm = _read_json(directory / LLM_CONFIG)
    lm.setdefault("model_type", "qwen2")
    lm["tie_word_embeddings"] = False  # BAGEL's loaders untie lm_head from the embeddings
    for key in ("torch_dtype", "dtype"):  # the loader's `dtype` decides, for every part alike
        lm.pop(key, None)
    vision = _read_json(directory / VIT_CONFIG)
    vision["num_hidden_layers"] = int(vision.get("num_hidden_layers", 1)) - 1
    for key in ("image_size", "vision_use_head", "architectures", "model_type", "torch_dtype"):
        vision.pop(key, None)
    with safe_open(directory / AE, framework="pt") as file:
        ae_shapes = {k: file.get_slice(k).get_shape() for k in file.keys()}  # noqa: SIM118 (no __iter__)
    vae = _vae_config(ae_shapes, directory / AE)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    add_special_tokens(tokenizer, modes)
    shape = {"lm": lm, "vision": vision, "vae": vae, "modes": tuple(modes)}
    shape.update(_table_sides(directory / EMA))
    return UnifiedConfig.bagel_7b(**{**shape, **overrides}), tokenizer


def _table_sides(path: Path) -> dict[str, int]:
    """`vision_pos_side` and `latent_pos_side` read off the position tables' shapes (side² rows)."""
    sides = {}
    with safe_open(path, framework="pt") as file:
        keys = set(file.keys())
        for field, key in (
            ("vision_pos_side", "vit_pos_embed.pos_embed"),
            ("latent_pos_side", "latent_pos_embed.pos_embed"),
        ):
            if key in keys:
                rows = file.get_slice(key).get_shape()[0]
                side = math.isqrt(rows)
                if side * side != rows:
                    raise ValueError(f"{path}: key {key!r} has {rows} rows, not a square number")
                sides[field] = side
    return sides


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _load_ema(model: UnifiedModel, path: Path) -> None:
    """Put every weight from `path` in place, tensor by tensor (peak memory: the weights once)."""
    targets = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not name.startswith("codec.")
    }
    wanted = {bagel_name(name): name for name in targets}
    errors = []
    with safe_open(path, framework="pt") as file:
        present = set(file.keys())
        errors += [
            f"{path}: key {key!r} is not a weight of the unified model"
            for key in sorted(present - wanted.keys())
        ]
        errors += [
            f"{path}: missing key {key!r} (for {wanted[key]!r})"
            for key in sorted(wanted.keys() - present)
        ]
        for key in sorted(present & wanted.keys()):
            name = wanted[key]
            tensor = file.get_tensor(key)
            if name == PATCH_EMBEDDING and tensor.ndim == 2:  # linear over (p, q, c) → conv
                p = targets[name].shape[-1]
                tensor = rearrange(tensor, "d (p q c) -> d c p q", p=p, q=p)
            if tensor.shape != targets[name].shape:
                errors.append(
                    f"{path}: key {key!r} has shape {list(tensor.shape)}, "
                    f"expected {list(targets[name].shape)} for {name!r}"
                )
                continue
            set_module_tensor_to_device(model, name, "cpu", value=tensor)
    _raise(errors)


def _vae_config(ae: dict[str, list[int]], path: Path) -> dict[str, Any]:
    """The FLUX autoencoder's diffusers config, its widths and depth read off the weights' shapes."""
    try:
        widths, level = [], 0
        while f"encoder.down.{level}.block.0.conv1.weight" in ae:
            widths.append(ae[f"encoder.down.{level}.block.0.conv1.weight"][0])
            level += 1
        depth = len({k.split(".")[4] for k in ae if k.startswith("encoder.down.0.block.")})
        latent = ae["encoder.conv_out.weight"][0] // 2
    except KeyError as err:
        raise ValueError(
            f"{path}: missing key {err.args[0]!r} (not a FLUX/LDM autoencoder?)"
        ) from None
    if not widths:
        raise ValueError(
            f"{path}: no 'encoder.down.0.block.0.conv1.weight' (not a FLUX/LDM autoencoder?)"
        )
    return {**flux_vae_config(tuple(widths)), "layers_per_block": depth, "latent_channels": latent}


def _load_ae(model: UnifiedModel, ae: dict[str, torch.Tensor], config: dict, path: Path) -> None:
    converted = convert_ldm_vae_checkpoint(ae, config)
    used = {tensor.data_ptr() for tensor in converted.values()}
    errors = [
        f"{path}: key {key!r} is not a weight of the autoencoder"
        for key, tensor in sorted(ae.items())
        if tensor.data_ptr() not in used
    ]
    vae = model.codec.vae
    converted = {k: v.float() for k, v in converted.items()}
    missing, unexpected = vae.load_state_dict(converted, strict=False, assign=True)
    errors += [f"{path}: nothing supplies the autoencoder's {name!r}" for name in missing]
    errors += [f"{path}: converted key {name!r} is not in the autoencoder" for name in unexpected]
    _raise(errors)


def _raise(errors: list[str]) -> None:
    if errors:
        more = f"\n… and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError("\n".join(errors[:20]) + more)
