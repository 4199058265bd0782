"""`python -m avr.bench memory`: the BAGEL configs' estimates, and shapes read from real folders."""

import re
from pathlib import Path

import pytest
import yaml

from avr.backbone import from_pretrained
from avr.bench import main as bench
from avr.memory import GIB, estimate, read_training_config


def test_bagel_configs_print_zero2_and_zero3_estimates(capsys):
    assert bench(["memory", "--config", "experiments/bagel/sft.yaml"]) == 0
    out = capsys.readouterr().out
    headline = out.strip().splitlines()[-1]
    match = re.search(
        r"([\d.]+) B parameters on 8 GPUs: model states ([\d.]+) GiB/GPU under ZeRO-2, ([\d.]+) GiB/GPU under ZeRO-3",
        headline,
    )
    assert match, headline
    total, zero2, zero3 = map(float, match.groups())
    assert 14 < total < 15.5  # BAGEL-7B-MoT: 7B active, 14B in all (the MoT twins)
    assert zero3 < zero2 < 80
    assert "UnifiedConfig.bagel_7b()" in out  # the folder is not here: the preset, said so


def test_lora_and_sharding_move_the_estimate_the_right_way():
    full = read_training_config("experiments/bagel/sft.yaml")
    lora = read_training_config("experiments/bagel/rl.yaml")
    assert full.zero_stage == lora.zero_stage == 3 and full.gpus_per_node == 8
    a, b = estimate(full), estimate(lora)
    assert b["counts"].trainable < 0.05 * b["counts"].total < a["counts"].trainable
    states = {name: gpu for name, gpu, _ in a["model_states"]}
    counts = a["counts"]
    # ZeRO-3 without offload: the largest layer gathered in fp32 + 18 B per trained parameter
    # and 2 B per frozen one, all sharded over the 8 GPUs
    expected = (4 * counts.largest_layer + 18 * counts.trainable / 8 + 2 * counts.frozen / 8) / GIB
    assert states["ZeRO-3"] == pytest.approx(expected, rel=1e-6)
    full.seq_len *= 2  # activations grow linearly with the row (fused attention: no L² scores)
    assert estimate(full)["activations"]["decoder"] == 2 * a["activations"]["decoder"]
    full.seq_len //= 2
    full.activation_checkpointing = False
    assert estimate(full)["activations"]["decoder"] > 5 * a["activations"]["decoder"]


def test_a_bagel_folder_gives_the_shape_of_the_loaded_model(bagel_dir, tmp_path):
    config = yaml.safe_load(Path("experiments/bagel/sft.yaml").read_text())
    config["model"]["init_args"]["model"]["path"] = str(bagel_dir)
    config["model"]["init_args"]["model"]["overrides"] = {"image_size": 64}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    shape = read_training_config(path)
    assert str(bagel_dir) in shape.source
    counts = estimate(shape)["counts"]
    model = from_pretrained(bagel_dir, image_size=64)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  init_args: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: not valid YAML"):
        read_training_config(path)


def test_configs_are_read_by_the_fit_parser(tmp_path, capsys):
    """The same parser as `avr.fit`: a key the module does not take is refused, not ignored, and
    what the YAML leaves out is the module's default."""
    base = yaml.safe_load(Path("experiments/bagel/rl.yaml").read_text())
    base["model"]["init_args"].pop("max_len", None)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base))
    assert read_training_config(good).seq_len == 2048  # RLModule's default max_len
    base["model"]["init_args"]["max_lenght"] = 4096
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base))
    with pytest.raises(ValueError, match=r"not a valid avr\.fit config"):
        read_training_config(bad)
    assert "max_lenght" in capsys.readouterr().err
