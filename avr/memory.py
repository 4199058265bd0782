"""Per-GPU memory of a training config: model states by DeepSpeed's own estimators, activations
by counting what each decoder layer keeps for the backward pass.

The model is built on the meta device from its config alone (no weight is read or allocated), so
a 7B estimate runs on a laptop. `python -m avr.bench memory --config CONFIG` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from avr.backbone.bagel import bagel_config, is_bagel_dir
from avr.backbone.config import UnifiedConfig
from avr.backbone.files import CONFIG, read_config
from avr.backbone.lora import LoraSettings, add_lora
from avr.backbone.model import UnifiedModel
from avr.defaults import shapeworld_tokenizer

GIB = 1024**3


@dataclass
class TrainingShape:
    """What a training config says about memory: the model and how it is trained and sharded."""

    config: UnifiedConfig
    source: str  # where the model's shape came from
    lora: LoraSettings | None
    activation_checkpointing: bool
    seq_len: int  # tokens in one packed row (one micro-batch row)
    gpus_per_node: int
    nodes: int
    zero_stage: int | None
    reference_copy: bool  # RL with a frozen reference copy of the policy


@dataclass
class ParamCounts:
    """Parameters of the configured model (adapters included) and its vocabulary size."""

    total: int
    trainable: int
    frozen: int
    largest_layer: int  # parameters of the largest single module (DeepSpeed's "largest layer")
    vocab: int


def read_training_config(path: str | Path, preset: str = "bagel_7b") -> TrainingShape:
    """Read a `python -m avr.fit` YAML through `avr.fit`'s own parser (`parse_config`: defaults
    filled in, types checked, nothing built). The model's shape comes from its folder (an avr
    export or a BAGEL checkpoint) when that exists here, else from `UnifiedConfig.<preset>()`."""
    from avr.fit import parse_config
    from avr.lit.base import ModelSettings

    path = Path(path)
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{line}: not valid YAML") from None
    try:
        data = parse_config(path)
    except SystemExit as err:  # the parser's own message is already printed
        raise ValueError(f"{path}: not a valid avr.fit config (see the message above)") from err
    trainer, model = data.get("trainer") or {}, (data.get("model") or {})
    args = model.get("init_args") or {}
    settings = ModelSettings(**(args.get("model") or {}))  # the parser's plain dict, typed again
    overrides = settings.overrides or {}
    folder = settings.path
    if folder is None:
        config, source = UnifiedConfig.from_dict(overrides), "the tiny ShapeWorld model"
    elif is_bagel_dir(folder):
        config, source = bagel_config(folder, **overrides)[0], f"BAGEL folder {folder}"
    elif (Path(folder) / CONFIG).is_file():
        config, source = read_config(folder, **overrides), f"avr export {folder}"
    else:
        if not hasattr(UnifiedConfig, preset):
            raise ValueError(
                f"preset {preset!r}: expected a UnifiedConfig classmethod (bagel_7b, qwen2_0_5b)"
            )
        config = getattr(UnifiedConfig, preset)(**overrides)
        source = f"UnifiedConfig.{preset}() ({folder} is not here)"
    is_rl = str(model.get("class_path", "")).endswith("RLModule")
    return TrainingShape(
        config=config,
        source=source,
        lora=settings.lora,
        activation_checkpointing=settings.activation_checkpointing,
        seq_len=int(args.get("max_len", 2048 if is_rl else 1024)),
        gpus_per_node=_devices(trainer.get("devices", 1)),
        nodes=int(trainer.get("num_nodes", 1)),
        zero_stage=_zero_stage(trainer.get("strategy"), path.parent),
        reference_copy=is_rl and not (settings.lora is not None and not settings.lora.trainable),
    )


def _devices(devices: Any) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    return 8  # "auto" / -1: a node of 8 GPUs is what the estimate assumes


def _zero_stage(strategy: Any, here: Path) -> int | None:
    """The ZeRO stage of a DeepSpeedStrategy (its `stage`, or its JSON config's)."""
    if not isinstance(strategy, dict) or "DeepSpeed" not in str(strategy.get("class_path", "")):
        return None
    init = strategy.get("init_args") or {}
    config = init.get("config")
    if isinstance(config, str):
        file = Path(config) if Path(config).is_file() else here / config
        config = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(config, dict):
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    return int(init.get("stage", 2))


def count_params(shape: TrainingShape) -> ParamCounts:
    """Parameter counts of the configured model, built on the meta device (nothing allocated)."""
    # The vocabulary is at least the LM config's `vocab_size` (a pretrained core's, or an export's);
    # ShapeWorld's tokenizer stands in for the real one.
    tokenizer = shapeworld_tokenizer(modes=shape.config.modes)
    with torch.device("meta"):
        model = UnifiedModel(shape.config, tokenizer)
        if shape.lora is not None:
            add_lora(model, shape.lora)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    largest = max(
        sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()
    )
    return ParamCounts(total, trainable, total - trainable, largest, model.lm.config.vocab_size)


def model_state_rows(shape: TrainingShape, counts: ParamCounts) -> list[tuple[str, float, float]]:
    """`(setup, GiB per GPU, GiB per CPU node)` for ZeRO-2 and ZeRO-3, from DeepSpeed's
    estimators (which assume every parameter they are given trains: given the trainable ones),
    plus the frozen parameters in bf16 (replicated under ZeRO-2, sharded under ZeRO-3) and the
    RL reference copy when there is one."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = shape.gpus_per_node * shape.nodes
    frozen = counts.frozen + (counts.total if shape.reference_copy else 0)
    rows = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            counts.trainable, shape.gpus_per_node, shape.nodes, cpu_offload=offload
        )
        name = "ZeRO-2" + (", optimizer offloaded to CPU" if offload else "")
        rows.append((name, (gpu + 2 * frozen) / GIB, cpu / GIB))
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.trainable,
            counts.largest_layer,
            shape.gpus_per_node,
            shape.nodes,
            cpu_offload=offload,
            cpu_offload_params=False,
            zero_init=True,
        )
        name = "ZeRO-3" + (", optimizer offloaded to CPU" if offload else "")
        rows.append((name, (gpu + 2 * frozen / gpus) / GIB, cpu / GIB))
    order = {"ZeRO-2": 0, "ZeRO-3": 1}
    return sorted(rows, key=lambda row: (order[row[0][:6]], row[0]))


def activation_bytes(shape: TrainingShape, vocab: int) -> dict[str, float]:
    """Activations of one packed row of `seq_len` tokens in bf16, per GPU, as bytes.

    Per token and decoder layer a Llama-family layer keeps for its backward pass the inputs of
    both norms and of the q/k/v, o and MLP projections, q and k before and after their norms, v,
    the attention output, and the SwiGLU's gate, up, activation and product: about
    `7·h + 3·kv + 4·I` values (h: width, kv: key/value width, I: MLP width). A fused attention
    kernel (flex, flash) keeps no `L²` scores; the dense SDPA fallback would add
    `heads · L²` per layer. With activation checkpointing each layer keeps only its input (`h`)
    and one layer's activations live again during its recomputation. Logits are counted apart:
    they cover only the text tokens that carry a loss."""
    lm = shape.config.lm
    h = lm["hidden_size"]
    heads = lm["num_attention_heads"]
    head_dim = lm.get("head_dim") or h // heads
    kv = (lm.get("num_key_value_heads") or heads) * head_dim
    inter = lm["intermediate_size"]
    layers = lm["num_hidden_layers"]
    per_layer_token = 2 * (7 * h + 3 * kv + 4 * inter)
    tokens = shape.seq_len
    if shape.activation_checkpointing:
        decoder = tokens * (layers * 2 * h + per_layer_token)
    else:
        decoder = tokens * layers * per_layer_token
    return {
        "decoder": decoder,
        "dense_attention_scores_per_layer": 2 * heads * tokens**2,
        "logits_per_1000_text_tokens": 1000 * vocab * (2 + 4),  # bf16 logits + fp32 log-softmax
    }


def estimate(shape: TrainingShape) -> dict[str, Any]:
    """Everything `python -m avr.bench memory` prints, as numbers."""
    counts = count_params(shape)
    return {
        "counts": counts,
        "model_states": model_state_rows(shape, counts),
        "activations": activation_bytes(shape, counts.vocab),
    }
