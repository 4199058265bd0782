"""A tiny random checkpoint in BAGEL's published layout, written here key by key from BAGEL's own
names (not from the loader's map), loads into the unified model, trains a step and generates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from avr.backbone import Session, UnifiedLoss, from_pretrained, pack, save_pretrained
from avr.backbone.bagel import from_bagel

D, HEADS, KV, FF, LAYERS, VOCAB = 64, 4, 2, 128, 2, 600
VIT_D, VIT_FF, VIT_LAYERS, VIT_PATCH, VIT_SIDE = 32, 64, 2, 4, 20
LATENT, LATENT_SIDE, AE_WIDTHS = 16, 18, (32, 32)
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
}
VIT_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": VIT_D,
    "intermediate_size": VIT_FF,
    "num_hidden_layers": VIT_LAYERS + 1,  # BAGEL's loaders drop the last layer
    "num_attention_heads": 2,
    "patch_size": VIT_PATCH,
    "image_size": 980,
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
    """The FLUX autoencoder's original (LDM) names, two levels of 32 channels, 2 blocks each."""
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
    conv("encoder.down.0.downsample.conv", w, w)
    conv("decoder.up.1.upsample.conv", w, w)
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


@pytest.fixture(scope="module")
def bagel_dir(tmp_path_factory):
    return write_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture(scope="module")
def bagel(bagel_dir):
    return from_pretrained(bagel_dir, image_size=64).eval()


def test_every_weight_comes_from_its_bagel_key(bagel, bagel_dir):
    ema, ae = load_file(bagel_dir / "ema.safetensors"), load_file(bagel_dir / "ae.safetensors")
    mine = bagel.state_dict()
    pairs = {
        "gen_layers.1.self_attn.k_norm.weight": "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight",
        "gen_layers.0.mlp.down_proj.weight": "language_model.model.layers.0.mlp_moe_gen.down_proj.weight",
        "gen_layers.0.post_attention_layernorm.weight": "language_model.model.layers.0.post_attention_layernorm_moe_gen.weight",
        "lm.model.layers.1.self_attn.q_norm.weight": "language_model.model.layers.1.self_attn.q_norm.weight",
        "lm.model.layers.0.self_attn.q_proj.bias": "language_model.model.layers.0.self_attn.q_proj.bias",
        "gen_norm.weight": "language_model.model.norm_moe_gen.weight",
        "lm.lm_head.weight": "language_model.lm_head.weight",
        "connector.0.weight": "connector.fc1.weight",
        "time_embed.linear_2.bias": "time_embedder.mlp.2.bias",
        "latent_in.weight": "vae2llm.weight",
        "velocity_out.bias": "llm2vae.bias",
        "latent_pos_table": "latent_pos_embed.pos_embed",
        "vision_pos_table": "vit_pos_embed.pos_embed",
        "vision.encoder.layers.1.mlp.fc2.weight": "vit_model.vision_model.encoder.layers.1.mlp.fc2.weight",
    }
    for name, key in pairs.items():
        assert torch.equal(mine[name], ema[key]), name
    assert torch.equal(mine["codec.vae.encoder.conv_in.weight"], ae["encoder.conv_in.weight"])
    assert torch.equal(
        mine["codec.vae.decoder.mid_block.attentions.0.to_q.weight"],
        ae["decoder.mid.attn_1.q.weight"][:, :, 0, 0],
    )
    # Every tensor of the model is one of the file's (none left at its random init) …
    sources = [*ema.values(), *ae.values()]
    fingerprints = {(tuple(t.shape), round(float(t.double().sum()), 6)) for t in sources}
    fingerprints |= {(tuple(t.squeeze().shape), round(float(t.double().sum()), 6)) for t in sources}
    for name, tensor in mine.items():
        if name != "vision.embeddings.patch_embedding.weight":
            key = (tuple(tensor.shape), round(float(tensor.double().sum()), 6))
            assert key in fingerprints, f"{name} was not loaded"
    # … and as many of them as the two files hold.
    assert len(mine) == len(ema) + len(ae)


def test_the_patch_embedding_reads_patches_as_bagel_does(bagel, bagel_dir):
    """BAGEL's linear patch embedding over (p, q, c)-flattened patches equals our convolution."""
    ema = load_file(bagel_dir / "ema.safetensors")
    linear_w = ema["vit_model.vision_model.embeddings.patch_embedding.weight"]
    image = torch.rand(1, 3, 32, 32)
    conv = bagel.vision.embeddings.patch_embedding(image)  # [1, D, 8, 8]
    patch = image[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)  # row 1, column 2, (p, q, c)
    expected = linear_w @ patch + ema["vit_model.vision_model.embeddings.patch_embedding.bias"]
    torch.testing.assert_close(conv[0, :, 1, 2], expected, rtol=1e-5, atol=1e-5)


def test_bagel_shape_and_config(bagel):
    config = bagel.config
    assert config.generation_expert and config.qk_norm and config.latent_channels_last
    assert (config.vision_pos_side, config.latent_pos_side) == (VIT_SIDE, LATENT_SIDE)
    assert len(bagel.vision.encoder.layers) == VIT_LAYERS
    assert bagel.geometry.gen_tokens == 256 and bagel.geometry.token_dim == 2 * 2 * LATENT
    assert bagel.lm.get_input_embeddings().num_embeddings == VOCAB > len(bagel.tokenizer)
    assert "<img>" in bagel.tokenizer.get_vocab()  # avr's structure tokens were added


def test_forward_backward_and_two_step_generation(bagel, make_trajectories):
    batch = pack(make_trajectories(2), bagel.tokenizer, bagel.geometry, 4096)
    out = bagel(batch)
    assert out.logits.shape[-1] == len(bagel.tokenizer)  # padded vocabulary rows never predicted
    loss, stats = UnifiedLoss()(out)
    assert torch.isfinite(loss) and stats["tokens/image"] > 0
    loss.backward()
    assert bagel.gen_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert bagel.vision.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    bagel.zero_grad(set_to_none=True)

    session = Session(bagel, 2)
    session.append_text(["a red circle", "two blue squares"])
    with torch.no_grad():
        image = session.generate_image(steps=2, cfg_scale=2.0, noise_level=0.5)
    assert image.pixels.shape == (2, 3, 64, 64) and image.nfe == 4
    assert image.logprobs.shape == (2, 2) and torch.isfinite(image.logprobs).all()
    text = session.sample_text(3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert all(0 <= i < len(bagel.tokenizer) for row in text.ids for i in row)


def test_a_loaded_bagel_saves_and_reloads_in_avr_format(bagel, tmp_path):
    reloaded = from_pretrained(save_pretrained(bagel, tmp_path / "avr"))
    theirs = reloaded.state_dict()
    assert theirs.keys() == bagel.state_dict().keys()
    for name, tensor in bagel.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    same = {k: v for k, v in bagel.config.to_dict().items() if k not in ("lm", "vae")}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k in same} == same
    assert len(reloaded.tokenizer) == len(bagel.tokenizer)


def _broken(tmp_path, mutate, vit=VIT_CONFIG):
    ema = _random(_ema_shapes(), seed=0)
    mutate(ema)
    return write_bagel(tmp_path / "broken", ema=ema, vit=vit)


def test_an_unknown_key_is_an_error_naming_it(tmp_path):
    path = _broken(tmp_path, lambda ema: ema.update({"extra_head.weight": torch.zeros(2)}))
    with pytest.raises(
        ValueError, match=r"ema.safetensors: key 'extra_head.weight' is not a weight"
    ):
        from_bagel(path, image_size=64)


def test_a_missing_key_is_an_error_naming_it(tmp_path):
    key = "language_model.model.layers.1.self_attn.v_proj_moe_gen.bias"
    path = _broken(tmp_path, lambda ema: ema.pop(key))
    with pytest.raises(
        ValueError, match=rf"missing key '{key}' \(for 'gen_layers.1.self_attn.v_proj.bias'\)"
    ):
        from_bagel(path, image_size=64)


def test_a_wrong_shape_or_layer_count_is_an_error_naming_the_key(tmp_path):
    def narrow(ema):
        ema["vae2llm.weight"] = torch.zeros(D, 8)

    with pytest.raises(
        ValueError, match=r"key 'vae2llm.weight' has shape \[64, 8\], expected \[64, 64\]"
    ):
        from_bagel(_broken(tmp_path, narrow), image_size=64)
    deeper = {**VIT_CONFIG, "num_hidden_layers": VIT_LAYERS}  # one layer short after BAGEL's −1
    with pytest.raises(
        ValueError,
        match=r"key 'vit_model.vision_model.encoder.layers.1.layer_norm1.bias' is not a weight",
    ):
        from_bagel(_broken(tmp_path, lambda ema: None, vit=deeper), image_size=64)


def test_missing_files_and_bad_json_are_named(tmp_path, bagel_dir):
    with pytest.raises(FileNotFoundError, match=r"ae\.safetensors: missing"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "llm_config.json").write_text("{}")
        for name in ("vit_config.json", "ema.safetensors"):
            (tmp_path / "x" / name).write_bytes((bagel_dir / name).read_bytes())
        from_bagel(tmp_path / "x")
    path = write_bagel(tmp_path / "json")
    (path / "llm_config.json").write_text('{"hidden_size": 64,\n "oops"}')
    with pytest.raises(ValueError, match=r"llm_config.json:2: not valid JSON"):
        from_bagel(path, image_size=64)
