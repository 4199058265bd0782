"""LoRA through peft: what trains, merging back to plain layers, the adapter-free reference."""

import dataclasses

import pytest
import torch
from torch import nn

from avr.backbone import UnifiedConfig, UnifiedLoss, pack
from avr.backbone.lora import LoraSettings, adapters_disabled, add_lora, lora_layers, merge_lora
from avr.defaults import tiny_model
from avr.lit.base import ModelSettings
from avr.lit.rl import RLModule

CONFIG = dataclasses.replace(UnifiedConfig(), generation_expert=True, cfg_dropout=0.0)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(batch)
    return out.logits, out.velocity


def _perturb_adapters(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters an effect
                param.copy_(0.1 * torch.randn(param.shape, generator=g))


def test_adapters_cover_both_experts_and_only_they_train(make_trajectories):
    model = add_lora(tiny_model(0, CONFIG), LoraSettings(r=4))
    names = [n for n, _ in lora_layers(model)]
    assert "lm.model.layers.0.self_attn.q_proj" in names and "gen_layers.3.mlp.down_proj" in names
    assert len(names) == 2 * 4 * 7  # both experts × 4 layers × 7 linears
    assert not any(n.startswith("vision.") for n in names)  # the reader stays as it is
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        "lora_" in n or n.startswith(("latent_in", "velocity_out", "time_embed")) for n in trained
    )
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048, seeds=[0, 1])
    base = tiny_model(0, CONFIG)
    for mine, theirs in zip(_outputs(model, batch), _outputs(base, batch), strict=True):
        torch.testing.assert_close(mine, theirs)  # B = 0: the adapters start as the identity
    loss, _ = UnifiedLoss()(model(batch))
    loss.backward()
    lora_b = model.get_submodule("gen_layers.0.self_attn.v_proj").lora_B["default"].weight
    assert lora_b.grad.abs().sum() > 0
    assert model.get_submodule("lm.model.embed_tokens").weight.grad is None


def test_merging_gives_plain_layers_with_the_same_outputs(make_trajectories):
    model = add_lora(tiny_model(0, CONFIG), LoraSettings(r=4, alpha=8))
    _perturb_adapters(model)
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048, seeds=[0, 1])
    before = _outputs(model, batch)
    layer = model.get_submodule("lm.model.layers.1.mlp.up_proj")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer().weight + (8 / 4) * b @ a
    merge_lora(model)
    assert type(model.get_submodule("lm.model.layers.1.mlp.up_proj")) is nn.Linear
    torch.testing.assert_close(
        model.get_submodule("lm.model.layers.1.mlp.up_proj").weight, expected
    )
    assert model.state_dict().keys() == tiny_model(0, CONFIG).state_dict().keys()
    for merged, unmerged in zip(_outputs(model, batch), before, strict=True):
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_adapters_disabled_is_the_base_model(make_trajectories):
    model = add_lora(tiny_model(0, CONFIG), LoraSettings(r=4))
    _perturb_adapters(model)
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048, seeds=[0, 1])
    base = _outputs(tiny_model(0, CONFIG), batch)
    with adapters_disabled(model):
        off = _outputs(model, batch)
    on = _outputs(model, batch)
    for got, want in zip(off, base, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(on[0], base[0])  # and they are back on after the block


def test_rl_with_adapters_only_needs_no_reference_copy(make_trajectories):
    module = RLModule(model=ModelSettings(lora=LoraSettings(r=4, trainable=())))
    assert module.reference is None
    assert not any(
        p.requires_grad for n, p in module.backbone.named_parameters() if "lora_" not in n
    )
    _perturb_adapters(module.backbone)
    model = module.backbone
    batch = pack(make_trajectories(2), model.tokenizer, model.geometry, 2048, seeds=[0, 1])
    ref = module._reference(lambda reference: reference(batch))
    torch.testing.assert_close(ref.logits, _outputs(tiny_model(0), batch)[0])
    # heads train in full: a frozen copy
    full = RLModule(model=ModelSettings(lora=LoraSettings(r=4)))
    assert full.reference is not None


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(ValueError, match=r"lora key 'target_modules': none of \['qkv'\]"):
        add_lora(tiny_model(0), LoraSettings(target_modules=("qkv",)))
