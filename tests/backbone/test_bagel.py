"""A tiny random checkpoint in BAGEL's published layout (`bagel_layout`, written key by key from
BAGEL's own names, not from the loader's map) loads into the unified model, trains a step and
generates; every way the folder can be wrong is an error that names the key or file."""

from __future__ import annotations

import json

import pytest
import torch
from bagel_layout import (
    LATENT,
    LATENT_SIDE,
    VIT_CONFIG,
    VIT_LAYERS,
    VIT_SIDE,
    VOCAB,
    D,
    _ema_shapes,
    _random,
    write_bagel,
)
from safetensors.torch import load_file

from avr.backbone import Session, UnifiedLoss, from_pretrained, pack, save_pretrained
from avr.backbone.bagel import from_bagel


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
        "latent_pos_embed.pos_embed": "latent_pos_embed.pos_embed",
        "vision_pos_embed.pos_embed": "vit_pos_embed.pos_embed",
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
    conv = bagel.vision.embeddings.patch_embedding(image)  # [1, D, 4, 4]
    patch = image[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1)  # row 1, column 2, (p, q, c)
    expected = linear_w @ patch + ema["vit_model.vision_model.embeddings.patch_embedding.bias"]
    torch.testing.assert_close(conv[0, :, 1, 2], expected, rtol=1e-5, atol=1e-5)


def test_bagel_shape_and_config(bagel):
    config = bagel.config
    assert config.generation_expert and config.qk_norm and config.latent_channels_last
    assert (config.vision_pos_side, config.latent_pos_side) == (VIT_SIDE, LATENT_SIDE)
    assert len(bagel.vision.encoder.layers) == VIT_LAYERS
    assert bagel.geometry.gen_tokens == 64 and bagel.geometry.token_dim == 2 * 2 * LATENT
    assert bagel.lm.get_input_embeddings().num_embeddings == VOCAB > len(bagel.tokenizer)
    assert "<img>" in bagel.tokenizer.get_vocab()  # avr's structure tokens were added
    # built on the meta device, then filled: nothing left on meta, the frozen parts still frozen
    assert not any(p.is_meta for p in bagel.parameters())
    frozen = {n for n, p in bagel.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in bagel.named_parameters() if n.startswith("codec.vae.")} | {
        "latent_pos_embed.pos_embed",
        "vision_pos_embed.pos_embed",
    }


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


def test_a_bfloat16_llm_config_loads_in_one_dtype_end_to_end(bagel_dir, make_trajectories):
    """`llm_config.json` says `"torch_dtype": "bfloat16"` (as Qwen2.5's does): the model is still
    float32 throughout by default, and bfloat16 throughout when asked; both run a forward."""
    assert json.loads((bagel_dir / "llm_config.json").read_text())["torch_dtype"] == "bfloat16"
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = from_pretrained(bagel_dir, image_size=64, **kwargs).eval()
        assert {p.dtype for p in model.parameters()} == {expected}
        batch = pack(make_trajectories(1), model.tokenizer, model.geometry, 4096)
        with torch.no_grad():
            out = model(batch)
        assert out.logits.dtype == expected and torch.isfinite(out.velocity.float()).all()
    with pytest.raises(ValueError, match="dtype: expected a floating torch dtype"):
        from_pretrained(bagel_dir, dtype="int8")


def test_the_fixture_siglip_table_is_what_bagel_builds(bagel_dir):
    """BAGEL's SigLIP embeddings hold (image_size // patch_size)² positions."""
    vit = json.loads((bagel_dir / "vit_config.json").read_text())
    table = load_file(bagel_dir / "ema.safetensors")[
        "vit_model.vision_model.embeddings.position_embedding.weight"
    ]
    assert table.shape[0] == (vit["image_size"] // vit["patch_size"]) ** 2


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


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_the_dense_mask_on_the_bagel_shape(bagel_dir, make_trajectories):
    """The configs' `attention: flex` path (QK-norm, both experts, NaViT reader) on CPU forward."""
    model = from_pretrained(bagel_dir, image_size=64, attention="sdpa").eval()
    batch = pack(make_trajectories(4), model.tokenizer, model.geometry, 600, seeds=[1, 2, 3, 4])
    assert batch.input_ids.shape[0] > 1
    with torch.no_grad():
        dense = model(batch)
        model.config.attention = "flex"
        flex = model(batch)
    torch.testing.assert_close(flex.logits, dense.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flex.velocity, dense.velocity, rtol=1e-4, atol=1e-4)
