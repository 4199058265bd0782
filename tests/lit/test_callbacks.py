import csv

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from avr.data.build import build, parse_mix
from avr.data.datamodule import TrajectoryDataModule
from avr.lit.callbacks import PromptUse, SelfUnderstanding
from avr.lit.sft import SFTModule
from avr.world.split import is_held_out


def test_prompt_use_measures_held_out_prompts():
    callback = PromptUse(prompts=6, steps=2)
    assert len(callback.specs) == 6 and all(is_held_out(s) for s in callback.specs)
    module = SFTModule(model=None, seed=0)
    measured = callback.measure(module.backbone)
    # an untrained model detects no object, so the precisions are NaN and left out
    expected = {"objects_per_image", "exact", "accuracy", "shuffled_loss_ratio"}
    assert expected | {"context_loss_ratio"} <= set(measured)
    assert measured["shuffled_loss_ratio"] > 0 and measured["context_loss_ratio"] > 0


def test_self_understanding_scores_the_models_own_critiques_and_restores_training_mode():
    callback = SelfUnderstanding(prompts=4, steps=2)
    assert all(is_held_out(s) for s in callback.specs)
    module = SFTModule(model=None, seed=0)
    module.backbone.train()
    measured = callback.measure(module.backbone)
    assert module.backbone.training
    assert {"reflect_accuracy", "plan_accuracy", "critique_agreement", "miss_rate"} <= set(measured)
    assert all(0.0 <= v <= 1.0 for v in measured.values())


@pytest.mark.slow
def test_sft_logs_prompt_use(tmp_path):
    data = tmp_path / "data"
    build(data, 8, parse_mix("simple=1"), seed=0, mode="direct")
    trainer = L.Trainer(
        max_steps=4,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[PromptUse(every_n_steps=2, prompts=4, steps=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(
        SFTModule(model=None, seed=0, ema_decay=0.9),
        TrajectoryDataModule(str(data), batch_size=4, num_workers=0),
    )
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [r for r in rows if r.get("val/prompt_use/shuffled_loss_ratio")]
    assert [r["step"] for r in logged] == ["2", "4"]  # once per measurement, not repeated
    assert float(logged[0]["val/prompt_use/shuffled_loss_ratio"]) > 0
