import json

from avr.backbone import save_pretrained
from avr.data.__main__ import main
from avr.data.build import build, parse_mix
from avr.data.labels import ModeLabeler
from avr.defaults import tiny_model
from avr.world import parse_spec, sample_specs
from avr.world.split import is_held_out


def test_a_labeler_picks_the_cheapest_mode_that_succeeds(tmp_path):
    """Told that reflect succeeds on everything and direct on nothing, every adaptive trajectory
    is a reflect one, whatever its level; the manifest records the labels and their source."""
    asked = []

    def labeler(mode, spec):
        asked.append(mode)
        return mode == "reflect"

    mix = parse_mix("simple=0.5,complex=0.5")
    manifest = build(tmp_path / "d", 12, mix, seed=1, labeler=labeler, label_source="test")
    assert manifest["labels"]["source"] == "test"
    assert set(manifest["counts"]["mode"]) == {"reflect"}
    assert sum(sum(m.values()) for m in manifest["labels"]["by_level"].values()) == 12
    assert asked[:2] == ["direct", "reflect"]  # cheapest first, stops at the first success
    assert "plan" not in asked


def test_a_model_that_fails_everything_falls_back_to_the_complexity_labels(tmp_path, capsys):
    model = tiny_model(0)
    save_pretrained(model, tmp_path / "m")
    argv = ["build", "--n", "3", "--mix", "simple=1", "--seed", "2", "-o", str(tmp_path / "d")]
    argv += ["--label-model", str(tmp_path / "m"), "--label-samples", "1", "--label-steps", "2"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["labels"]["source"].startswith(f"model {tmp_path / 'm'}")
    assert manifest["labels"]["by_level"] == {"simple": {"direct": 3}}
    assert "adaptive labels by level" in capsys.readouterr().out


def test_success_rates_are_cached_and_deterministic():
    model = tiny_model(0)
    spec = sample_specs(1, seed=4)[0]
    labeler = ModeLabeler(model, samples=2, steps=2, max_text_tokens=8)
    rate = labeler.success_rate("direct", spec)
    assert 0.0 <= rate <= 1.0 and labeler.rates == {("direct", spec): rate}
    assert ModeLabeler(model, samples=2, steps=2).success_rate("direct", spec) == rate


def test_training_data_holds_no_held_out_prompt(tmp_path):
    manifest = build(tmp_path / "d", 60, parse_mix("simple=1,medium=1,complex=1"), seed=5)
    assert manifest["split"] == "train"
    held = {s.prompt for s in sample_specs(400, seed=9, split="heldout")}
    assert all(is_held_out(s) for s in sample_specs(50, seed=9, split="heldout"))
    specs = [
        parse_spec(json.loads(line)["meta"]["spec"])
        for shard in sorted((tmp_path / "d").glob("shard-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    assert len(specs) == 60 and not any(is_held_out(s) for s in specs)
    assert not {s.prompt for s in specs} & held
