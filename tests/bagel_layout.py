"""A tiny random checkpoint in BAGEL's published layout, written key by key from BAGEL's own
names (not from the loader's map): the `bagel_dir` fixture and `write_bagel` of the tests."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

D, HEADS, KV, FF, LAYERS, VOCAB = 64, 4, 2, 128, 2, 600
VIT_D, VIT_FF, VIT_LAYERS, VIT_PATCH, VIT_SIDE = 32, 64, 2, 8, 10
LATENT, LATENT_SIDE, AE_WIDTHS = 16, 9, (32, 32, 32)
LLM_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": D,
    "intermediate_size": FF,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",  # as Qwen2.5's config files (and BAGEL's copy of them) carry
}
VIT_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": VIT_D,
    "intermediate_size": VIT_FF,
    "num_hidden_layers": VIT_LAYERS + 1,  # BAGEL's loaders drop the last layer
    "num_attention_heads": 2,
    "patch_size": VIT_PATCH,
    # BAGEL builds its SigLIP position table with (image_size // patch_size)² rows (4,900 for
    # 980 px in 14 px patches): this folder's table has VIT_SIDE² rows, so its config says so
    "image_size": VIT_SIDE * VIT_PATCH,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def _ema_shapes() -> dict[str, tuple[int, ...]]:
    """BAGEL's `ema.safetensors` names and shapes for the tiny config (Qwen2 MoT + SigLIP)."""
    head = D // HEADS
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (VOCAB, D),
        "language_model.model.norm.weight": (D,),
        "language_model.model.norm_moe_gen.weight": (D,),
        "language_model.lm_head.weight": (VOCAB, D),
    }
    for i in range(LAYERS):
        layer = f"language_model.model.layers.{i}"
        for twin in ("", "_moe_gen"):
            attn = f"{layer}.self_attn"
            shapes |= {
                f"{attn}.q_proj{twin}.weight": (D, D),
                f"{attn}.q_proj{twin}.bias": (D,),
                f"{attn}.k_proj{twin}.weight": (KV * head, D),
                f"{attn}.k_proj{twin}.bias": (KV * head,),
                f"{attn}.v_proj{twin}.weight": (KV * head, D),
                f"{attn}.v_proj{twin}.bias": (KV * head,),
                f"{attn}.o_proj{twin}.weight": (D, D),
                f"{attn}.q_norm{twin}.weight": (head,),
                f"{attn}.k_norm{twin}.weight": (head,),
                f"{layer}.mlp{twin}.gate_proj.weight": (FF, D),
                f"{layer}.mlp{twin}.up_proj.weight": (FF, D),
                f"{layer}.mlp{twin}.down_proj.weight": (D, FF),
                f"{layer}.input_layernorm{twin}.weight": (D,),
                f"{layer}.post_attention_layernorm{twin}.weight": (D,),
            }
    vit = "vit_model.vision_model"
    shapes |= {
        f"{vit}.embeddings.patch_embedding.weight": (VIT_D, VIT_PATCH * VIT_PATCH * 3),
        f"{vit}.embeddings.patch_embedding.bias": (VIT_D,),
        f"{vit}.embeddings.position_embedding.weight": (VIT_SIDE**2, VIT_D),
        f"{vit}.post_layernorm.weight": (VIT_D,),
        f"{vit}.post_layernorm.bias": (VIT_D,),
    }
    for i in range(VIT_LAYERS):
        layer = f"{vit}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}.self_attn.{proj}.weight": (VIT_D, VIT_D)}
            shapes |= {f"{layer}.self_attn.{proj}.bias": (VIT_D,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}.{norm}.weight": (VIT_D,), f"{layer}.{norm}.bias": (VIT_D,)}
        shapes |= {
            f"{layer}.mlp.fc1.weight": (VIT_FF, VIT_D),
            f"{layer}.mlp.fc1.bias": (VIT_FF,),
            f"{layer}.mlp.fc2.weight": (VIT_D, VIT_FF),
            f"{layer}.mlp.fc2.bias": (VIT_D,),
        }
    token = 2 * 2 * LATENT
    shapes |= {
        "connector.fc1.weight": (D, VIT_D),
        "connector.fc1.bias": (D,),
        "connector.fc2.weight": (D, D),
        "connector.fc2.bias": (D,),
        "vit_pos_embed.pos_embed": (VIT_SIDE**2, D),
        "latent_pos_embed.pos_embed": (LATENT_SIDE**2, D),
        "time_embedder.mlp.0.weight": (D, 256),
        "time_embedder.mlp.0.bias": (D,),
        "time_embedder.mlp.2.weight": (D, D),
        "time_embedder.mlp.2.bias": (D,),
        "vae2llm.weight": (D, token),
        "vae2llm.bias": (D,),
        "llm2vae.weight": (token, D),
        "llm2vae.bias": (token,),
    }
    return shapes


def _ae_shapes() -> dict[str, tuple[int, ...]]:
    """The FLUX autoencoder's original (LDM) names: three levels of 32 channels, 2 blocks each."""
    w = AE_WIDTHS[0]
    shapes: dict[str, tuple[int, ...]] = {}

    def resnet(prefix):
        for norm in ("norm1", "norm2"):
            shapes.update({f"{prefix}.{norm}.weight": (w,), f"{prefix}.{norm}.bias": (w,)})
        for conv in ("conv1", "conv2"):
            shapes.update({f"{prefix}.{conv}.weight": (w, w, 3, 3), f"{prefix}.{conv}.bias": (w,)})

    def conv(prefix, out, inp, k=3):
        shapes.update({f"{prefix}.weight": (out, inp, k, k), f"{prefix}.bias": (out,)})

    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1")
        resnet(f"{part}.mid.block_2")
        attn = f"{part}.mid.attn_1"
        shapes.update({f"{attn}.norm.weight": (w,), f"{attn}.norm.bias": (w,)})
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{attn}.{name}", w, w, k=1)
        shapes.update({f"{part}.norm_out.weight": (w,), f"{part}.norm_out.bias": (w,)})
    conv("encoder.conv_in", w, 3)
    conv("encoder.conv_out", 2 * LATENT, w)
    conv("decoder.conv_in", w, LATENT)
    conv("decoder.conv_out", 3, w)
    for level in range(len(AE_WIDTHS)):
        for block in range(2):
            resnet(f"encoder.down.{level}.block.{block}")
        for block in range(3):
            resnet(f"decoder.up.{level}.block.{block}")
    for level in range(len(AE_WIDTHS) - 1):
        conv(f"encoder.down.{level}.downsample.conv", w, w)
        conv(f"decoder.up.{level + 1}.upsample.conv", w, w)
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("norm.weight") or "norm1.weight" in key or "norm2.weight" in key:
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def _tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen-like byte-level BPE without any of avr's structural tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a red circle left of a blue square"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def write_bagel(directory, ema=None, vit=VIT_CONFIG):
    directory.mkdir(parents=True, exist_ok=True)
    ema = _random(_ema_shapes(), seed=0) if ema is None else ema
    save_file(ema, str(directory / "ema.safetensors"))
    save_file(_random(_ae_shapes(), seed=1), str(directory / "ae.safetensors"))
    (directory / "llm_config.json").write_text(json.dumps(LLM_CONFIG))
    (directory / "vit_config.json").write_text(json.dumps(vit))
    _tokenizer().save_pretrained(directory)
    return directory
