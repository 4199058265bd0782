"""The Backbone protocol: the unified model implements it, and checkpoints find classes by kind."""

import pytest

from avr.backbone import UnifiedModel
from avr.backbone.janus import JanusBackbone
from avr.backbone.protocol import Backbone, backbone_class, register_backbone
from avr.defaults import tiny_model


def test_the_unified_model_is_a_backbone_and_rebuilds_from_its_checkpoint_config():
    model = tiny_model(0)
    assert isinstance(model, Backbone)
    rebuilt = backbone_class(model.kind).from_checkpoint_config(
        model.checkpoint_config(), model.tokenizer
    )
    assert type(rebuilt) is UnifiedModel
    assert rebuilt.checkpoint_config() == model.checkpoint_config()
    assert backbone_class("janus") is JanusBackbone


def test_unknown_and_duplicate_kinds_are_errors():
    with pytest.raises(
        ValueError, match="unknown backbone kind 'llava'; registered: janus, unified"
    ):
        backbone_class("llava")

    class Impostor:
        kind = "unified"

    with pytest.raises(ValueError, match="backbone kind 'unified' is already registered"):
        register_backbone(Impostor)
