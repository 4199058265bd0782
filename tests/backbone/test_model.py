import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from avr.backbone import (
    UnifiedConfig,
    UnifiedLoss,
    UnifiedModel,
    add_special_tokens,
    from_pretrained,
    pack,
    save_pretrained,
)
from avr.backbone.tokenizer import special_tokens
from avr.defaults import shapeworld_tokenizer, tiny_model


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    save_pretrained(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    original, loaded = model.state_dict(), again.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert again.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    save_pretrained(again, tmp_path / "m")  # overwriting an existing folder is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_checkpoints_are_refused_with_the_key(model, tmp_path):
    folder = save_pretrained(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden": 3}))
    with pytest.raises(
        ValueError, match="unknown config key 'hidden'; expected one of lm, lm_path"
    ):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    weights.pop("velocity_out.bias")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights do not fit .*velocity_out\.bias"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        from_pretrained(tmp_path)


def test_config_errors_name_the_key():
    with pytest.raises(
        ValueError, match="config key 'codec': expected 'pixel' or 'vae', got 'jpeg'"
    ):
        UnifiedConfig(codec="jpeg")
    with pytest.raises(
        ValueError, match="config key 'patch_size': 7 does not divide image_size 64"
    ):
        UnifiedConfig(patch_size=7)


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_image_head_prediction_kinds(prediction):
    """x₀: one Euler step from t to 0 with the derived velocity lands on the head's x̂₀ (t above
    the floor); velocity: the head's output is the velocity."""
    model = tiny_model(0, UnifiedConfig(prediction=prediction))
    hidden = torch.randn(2, 64, 192)
    x_t = torch.randn(2, 64, model.codec.token_dim)
    t = torch.tensor([0.7, 0.3])
    velocity = model.velocity(hidden, x_t, t)
    head = model.velocity_out(hidden)
    if prediction == "x0":
        torch.testing.assert_close(x_t - t[:, None, None] * velocity, head)
    else:
        torch.testing.assert_close(velocity, head)
    with pytest.raises(ValueError, match="config key 'prediction': expected 'x0' or 'velocity'"):
        UnifiedConfig(prediction="eps")


def test_wrong_image_shape_is_a_clear_error(model):
    with pytest.raises(
        ValueError, match=r"expected images of shape \[B, 3, 64, 64\], got \[2, 1, 64, 64\]"
    ):
        model.embed_images(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected latent tokens \[M, 64, 192\]"):
        model.embed_latents(torch.zeros(1, 10, 192), torch.zeros(1))


def test_tokenizer_is_deterministic_and_has_single_special_tokens():
    a, b = shapeworld_tokenizer(), shapeworld_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    for token in special_tokens():
        assert len(a.encode(token, add_special_tokens=False)) == 1
    text = "a zebra-striped hexagon"  # outside the corpus: still encodes, and decodes back
    assert a.decode(a.encode(text, add_special_tokens=False)) == text


def test_pretrained_language_core_and_tokenizer(tmp_path, make_trajectories):
    """The `lm_path` route: a causal LM saved by transformers, and a tokenizer without our tokens."""
    torch.manual_seed(0)
    lm_config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
    )
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(tmp_path / "lm")
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "circle": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    added = add_special_tokens(tokenizer)
    assert added == 3 + len(special_tokens())
    assert add_special_tokens(tokenizer) == 0  # idempotent
    config = UnifiedConfig(lm_path=str(tmp_path / "lm"))
    model = UnifiedModel(config, tokenizer)
    assert model.lm.config.model_type == "llama"
    assert model.lm.get_input_embeddings().num_embeddings >= len(tokenizer)
    batch = pack(make_trajectories(2), tokenizer, model.geometry, 2048)
    loss, _ = UnifiedLoss()(model(batch))
    assert torch.isfinite(loss)


def test_vae_codec_with_a_tiny_autoencoder(make_trajectories):
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
    }
    config = dataclasses.replace(UnifiedConfig(), codec="vae", vae=vae, patch_size=2)
    model = tiny_model(0, config).eval()
    assert model.codec.latent_size == 32 and model.geometry.gen_tokens == 256
    assert model.geometry.token_dim == 4 * 2 * 2
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 4096)
    loss, stats = UnifiedLoss()(model(batch))
    assert torch.isfinite(loss) and stats["tokens/image"] > 0
    assert not any(p.requires_grad for p in model.codec.vae.parameters())  # the VAE stays frozen


def test_generation_expert_has_its_own_weights(make_trajectories):
    config = dataclasses.replace(UnifiedConfig(), generation_expert=True)
    model = tiny_model(0, config)
    dense = tiny_model(0)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in dense.parameters())
    per_layer = sum(p.numel() for p in dense.decoder.layers.parameters())
    assert extra == per_layer + sum(p.numel() for p in dense.decoder.norm.parameters())
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048)
    loss, _ = UnifiedLoss()(model(batch))
    loss.backward()
    assert model.gen_layers[0].mlp.up_proj.weight.grad.abs().sum() > 0  # generation tokens train it
    assert model.decoder.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_the_same_code_builds_the_half_billion_class(model):
    with torch.device("meta"):  # shapes only: nothing is allocated
        big = UnifiedModel(UnifiedConfig.qwen2_0_5b(), model.tokenizer)
    total = sum(p.numel() for p in big.parameters())
    assert 4e8 < total < 7e8
    assert big.geometry.gen_tokens == 256 and big.geometry.token_dim == 16 * 2 * 2
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 1e7  # the tiny default: a few million


def test_activation_checkpointing_gives_the_same_gradients(make_trajectories):
    config = dataclasses.replace(UnifiedConfig(), generation_expert=True, cfg_dropout=0.0)
    grads = []
    for recompute in (False, True):
        model = tiny_model(0, config).train()
        model.activation_checkpointing = recompute
        calls, layer = [], model._layer
        model._layer = lambda *a, calls=calls, layer=layer: calls.append(a[0]) or layer(*a)
        batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048, seeds=[0, 1])
        loss, _ = UnifiedLoss()(model(batch))
        loss.backward()
        assert len(calls) == 4 * (2 if recompute else 1)  # recomputed in the backward pass
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
