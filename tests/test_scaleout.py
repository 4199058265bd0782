"""Scale-out configs: DeepSpeed's own parser accepts ours on CPU; every overlay composes with the
main configs through the CLI."""

import glob
import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from avr.fit import main as fit

OVERLAYS = sorted(glob.glob("experiments/scaleout/*.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob("experiments/scaleout/zero*.json")))
def test_deepspeed_parses_our_zero_configs(path):
    config = DeepSpeedConfig(json.loads(Path(path).read_text()))
    assert config.zero_optimization_stage == int(Path(path).stem[-1])
    assert config.bfloat16_config.enabled and config.gradient_clipping == 1.0


def test_deepspeed_rejects_a_bad_key():
    with pytest.raises(Exception, match="bogus_key"):
        DeepSpeedConfig(
            {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "bogus_key": 1}}
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("main", ["experiments/sft.yaml", "experiments/rl.yaml"])
def test_overlays_compose_with_the_main_configs(main, overlay, capsys):
    with pytest.raises(SystemExit) as done:
        fit([main, "--config", overlay, "--print_config"])
    assert done.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "precision: bf16-mixed" in printed and (
        "DeepSpeedStrategy" in printed or "FSDPStrategy" in printed
    )
