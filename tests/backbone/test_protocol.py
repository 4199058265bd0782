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


_USER_BACKBONE = '''
from pathlib import Path

from avr.backbone import UnifiedModel, from_pretrained


class MirrorModel(UnifiedModel):
    """A user's backbone: the unified model, read from a folder that holds `mirror.txt` naming
    an avr model folder."""

    kind = "mirror"

    @staticmethod
    def reads_folder(directory):
        return (Path(directory) / "mirror.txt").is_file()

    @classmethod
    def from_pretrained(cls, directory, device="cpu", **overrides):
        inner = from_pretrained(Path(directory, "mirror.txt").read_text().strip(), device)
        model = cls(inner.config, inner.tokenizer)
        model.load_state_dict(inner.state_dict())
        return model
'''


@pytest.fixture
def backbone_points(monkeypatch, tmp_path):
    """Entry points of a fake distribution in the `avr.backbones` group, served beside the real
    ones; the registry is restored afterwards."""
    import importlib.metadata

    from avr.backbone import protocol

    saved, loaded, real = dict(protocol._BACKBONES), set(protocol._loaded), protocol.entry_points
    extra: list[importlib.metadata.EntryPoint] = []
    monkeypatch.setattr(
        protocol,
        "entry_points",
        lambda group: [*real(group=group), *[e for e in extra if e.group == group]],
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_backbone.py").write_text(_USER_BACKBONE)
    yield lambda name, value: extra.append(
        importlib.metadata.EntryPoint(name, value, protocol.GROUP)
    )
    protocol._BACKBONES.clear()
    protocol._BACKBONES.update(saved)
    protocol._loaded.clear()
    protocol._loaded.update(loaded)


def test_a_users_backbone_loads_through_its_entry_point_with_no_edit_of_avr(
    backbone_points, tmp_path
):
    from avr.backbone import from_pretrained
    from avr.pipeline import Pipeline

    backbone_points("mirror", "user_backbone:MirrorModel")
    folder = tmp_path / "mirrored"
    folder.mkdir()
    (folder / "mirror.txt").write_text("shapeworld-tiny-self")
    model = from_pretrained(folder)
    assert type(model).__name__ == "MirrorModel" and backbone_class("mirror") is type(model)
    out = Pipeline(model)(["a red circle"], mode="direct", seed=3)
    shipped = Pipeline.from_pretrained("shapeworld-tiny-self")(
        ["a red circle"], mode="direct", seed=3
    )
    assert out.images[0].tobytes() == shipped.images[0].tobytes()  # the same weights, read anew


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("mirror", "user_backbone:nothing_here", r"does not load: AttributeError"),
        ("mirror", "user_backbone:Path", r"names Path, which lacks kind"),
        ("looking-glass", "user_backbone:MirrorModel", r"the class's kind is 'mirror'"),
    ],
)
def test_a_broken_backbone_entry_point_is_an_error_naming_it(backbone_points, name, value, message):
    backbone_points(name, value)
    with pytest.raises(
        ValueError, match=rf"entry point '{name}' = '{value}' in group avr\.backbones"
    ):
        backbone_class("unified")
    with pytest.raises(ValueError, match=message):
        backbone_class("unified")


def test_both_sessions_implement_the_session_protocol_and_share_text_sampling():
    from avr.backbone.generation import Session, TextSession
    from avr.backbone.protocol import BackboneSession
    from avr.defaults import tiny_janus

    janus = tiny_janus(0)
    tokenizer = janus.tokenizer
    for session in (tiny_model(0).session(1), janus.session(1)):
        assert isinstance(session, BackboneSession) and isinstance(session, TextSession)
        session.append_tokens([[tokenizer.bos_token_id]])
        session.append_text(["a red circle"])
        text = session.sample_text(4, temperature=0.0)
        assert len(text.ids[0]) == len(text.logprobs[0]) and 1 <= len(text.ids[0]) <= 4
    assert not isinstance(janus.session(1), Session)  # not the unified model's, half set up
