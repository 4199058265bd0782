"""The BAGEL experiment configs train as written, on the tiny BAGEL-layout checkpoint on CPU: only
the hardware keys (accelerator, strategy, precision) and the sizes are overridden."""

import csv
from pathlib import Path

import pytest

from avr.backbone import from_pretrained
from avr.data.build import build, parse_mix
from avr.export import main as export
from avr.fit import main as fit

ON_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.max_steps=1",
    "--trainer.gradient_clip_val=1.0",
    "--model.init_args.model.overrides={image_size: 64, attention: sdpa, max_seq_len: 8192}",
]


@pytest.mark.slow
def test_bagel_sft_config_trains_and_exports(bagel_dir, tmp_path):
    data = tmp_path / "data"
    build(data, 4, parse_mix("simple=1,medium=1,complex=1"), seed=0)  # 64 px, the override's size
    root = tmp_path / "sft"
    fit(
        [
            "experiments/bagel/sft.yaml",
            *ON_CPU,
            "--model.init_args.max_len=8192",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--model.init_args.model.path={bagel_dir}",
            f"--data.init_args.path={data}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
        ]
    )
    (checkpoint,) = Path(root).rglob("last.ckpt")
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0
    model = from_pretrained(tmp_path / "export")
    assert model.config.generation_expert and model.config.qk_norm and model.config.image_size == 64


@pytest.mark.slow
def test_bagel_rl_config_trains_with_lora(bagel_dir, tmp_path):
    root = tmp_path / "rl"
    fit(
        [
            "experiments/bagel/rl.yaml",
            *ON_CPU,
            "--model.init_args.replay.max_len=8192",
            f"--trainer.default_root_dir={root}",
            f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{root}"}}}}',
            f"--model.init_args.model.path={bagel_dir}",
            "--model.init_args.group_size=2",
            "--model.init_args.sampling.steps=2",
            "--model.init_args.sampling.max_text_tokens=8",
            "--data.init_args.batch_size=1",
        ]
    )
    (metrics,) = Path(root).rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/reward")]
    assert len(rows) == 1
    (checkpoint,) = Path(root).rglob("last.ckpt")
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0  # adapters merged
    assert from_pretrained(tmp_path / "export").config.latent_channels_last
