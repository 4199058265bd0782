"""The command line: every shipped config parses, SFT and RL train a few steps, export round-trips."""

import csv
import glob
import json
import shlex
from pathlib import Path

import pytest
import torch

from avr.backbone import from_pretrained
from avr.data.build import build, parse_mix
from avr.defaults import tiny_model
from avr.export import main as export
from avr.fit import main as fit
from avr.lit.checkpointing import AtomicCheckpointIO

CONFIGS = sorted(glob.glob("experiments/*.yaml") + glob.glob("experiments/bagel/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        fit([config, "--print_config"])
    assert done.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path:" in printed and "trainer:" in printed


def test_each_ablation_overlay_drops_one_reward_of_rl_yaml(capsys):
    with pytest.raises(SystemExit):
        fit(["experiments/rl.yaml", "--print_config"])
    full = capsys.readouterr().out
    kept = {
        "CompositionalReward",
        "FormatReward",
        "StepwiseReasoningReward",
        "CritiqueAgreementReward",
        "ComplexityPenalty",
    }
    overlays = {  # the step-wise ablation drops every step-level check, the critique term too
        "rl-no-penalty": {"ComplexityPenalty"},
        "rl-no-stepwise": {"StepwiseReasoningReward", "CritiqueAgreementReward"},
    }
    for overlay, dropped in overlays.items():
        with pytest.raises(SystemExit):
            fit(
                [
                    "experiments/rl.yaml",
                    "--config",
                    f"experiments/ablations/{overlay}.yaml",
                    "--print_config",
                ]
            )
        ablated = capsys.readouterr().out
        assert all(name in full and name not in ablated for name in dropped)
        assert all(name in ablated for name in kept - dropped)
        assert ablated.count("extra_penalty: 0.1") == 1  # the kept terms keep their settings


def test_a_misspelt_key_names_the_valid_ones():
    with pytest.raises(
        SystemExit,
        match=r"takes no argument 'group_sise' \(did you mean 'group_size'\?\); valid: model, seed",
    ):
        fit(["experiments/rl.yaml", "--model.init_args.group_sise", "3"])


def test_a_misspelt_key_inside_a_settings_group_names_the_group_and_its_keys():
    with pytest.raises(
        SystemExit,
        match=r"model\.init_args\.objective: Objective has no key 'kl_txt' \(did you mean "
        r"'kl_text'\?\); valid: clip_eps, kl_text",
    ):
        fit(["experiments/rl.yaml", "--model.init_args.objective.kl_txt", "0.1"])


def test_an_unknown_class_names_the_known_ones():
    with pytest.raises(
        SystemExit,
        match=r"model: cannot import 'avr\.lit\.rl\.RLModul' .*avr provides: avr\.lit\.sft\.SFTModule, avr\.lit\.rl\.RLModule",
    ):
        fit(["experiments/rl.yaml", "--model.class_path", "avr.lit.rl.RLModul"])


@pytest.mark.parametrize(
    ("override", "cause"),
    [
        (
            ["--model.init_args.mode", "adaptiv"],
            r"^error: RegistryError: unknown mode 'adaptiv'; registered modes: .*adaptive",
        ),
        (
            ["--model.init_args.model.path", "no/such/folder"],
            r"^error: FileNotFoundError: model.path: no/such/folder is not a folder",
        ),
    ],
)
def test_a_failure_to_build_the_model_is_one_line_naming_the_cause(override, cause):
    with pytest.raises(SystemExit, match=cause) as raised:
        fit(["experiments/rl.yaml", *override])
    assert "\n" not in str(raised.value) and raised.value.code == 2


def test_the_direct_overlay_trains_the_generator_alone_with_a_stiff_extra_penalty_and_the_anchor(
    capsys,
):
    with pytest.raises(SystemExit):
        fit(
            [
                "experiments/rl.yaml",
                "--config",
                "experiments/overlays/rl-direct.yaml",
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "mode: direct" in printed and "group_size: 8" in printed
    assert "extra_penalty: 1.0" in printed and "CompositionalReward" in printed
    assert "ode_anchor: 0.01" in printed and "CleanBackgroundReward" in printed
    assert "FormatReward" not in printed and "ComplexityPenalty" not in printed
    # the shipped model's optimizer settings stay pinned whatever rl.yaml's become
    assert "lr: 0.0001" in printed and "by: step" in printed
    assert "image_weight: 1.0" in printed


def test_the_self_round_overlay_fine_tunes_the_edit_model_on_its_own_samples(capsys):
    with pytest.raises(SystemExit):
        fit(
            [
                "experiments/sft.yaml",
                "--config",
                "experiments/overlays/interleaved.yaml",
                "--config",
                "experiments/overlays/self-round.yaml",
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "path: checkpoints/shapeworld-tiny-edit" in printed
    assert "path: runs/round1-data" in printed and "SelfUnderstanding" in printed
    assert "lr: 0.0001" in printed and "max_steps: 600" in printed


@pytest.mark.parametrize("config", ["experiments/rl.yaml", "experiments/sft.yaml"])
def test_every_output_follows_default_root_dir(config, capsys):
    with pytest.raises(SystemExit):
        fit([config, "--trainer.default_root_dir", "elsewhere/run", "--print_config"])
    printed = capsys.readouterr().out
    dirs = [line.split(":", 1)[1].strip() for line in printed.splitlines() if "save_dir:" in line]
    assert dirs and set(dirs) == {"elsewhere/run"}


def test_the_progress_bar_counts_steps_when_there_are_no_epochs():
    import lightning as L

    from avr.lit.callbacks import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = L.Trainer(max_steps=30, callbacks=[bar], logger=False)  # set at fit's setup
    assert bar._get_train_description(0) == "steps"
    bar._trainer = L.Trainer(max_epochs=3, callbacks=[bar], logger=False)
    assert bar._get_train_description(0).startswith("Epoch 0/2")


@pytest.mark.slow
def test_sft_trains_checkpoints_and_exports(tmp_path):
    data = tmp_path / "data"
    build(data, 16, parse_mix("simple=1,medium=1,complex=1"), seed=0)
    root = tmp_path / "run"
    cli = fit(
        [
            "experiments/sft.yaml",
            "--trainer.max_steps",
            "3",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--data.init_args.path",
            str(data),
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.batch_size",
            "4",
        ]
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (checkpoint,) = Path(root).rglob("last.ckpt")
    torch.load(checkpoint, map_location="cpu", weights_only=True)  # no pickle needed
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0
    assert export([str(checkpoint), "-o", str(tmp_path / "e"), "--weights", "ema"]) == 2  # no EMA
    model = from_pretrained(tmp_path / "export")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"backbone.{name}"]), name
    from avr.cards import GENERATION_DEFAULTS, read_card, read_generation_config

    meta = read_card(tmp_path / "export" / "README.md")  # a model card in the Hub's layout
    assert meta["library_name"] == "avr" and meta["generation"] == GENERATION_DEFAULTS
    assert meta["training"]["step"] == 3 and meta["training"]["data"] == str(data)
    assert meta["training"]["module"] == "avr.lit.sft.SFTModule"
    assert (
        meta["training"]["data_build"]
        == json.loads((data / "manifest.json").read_text())["build_id"]
    )
    assert read_generation_config(tmp_path / "export") == GENERATION_DEFAULTS
    (tmp_path / "export" / "README.md").write_text("---\nlicense: mit\n---\n\nmine\n")
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0  # a re-export keeps it
    assert (tmp_path / "export" / "README.md").read_text().endswith("mine\n")


def test_a_cpu_with_fast_bf16_trains_in_bf16_mixed_unless_the_config_says(
    tmp_path, monkeypatch, capsys
):
    import avr.fit

    assert avr.fit.cpu_precision("cpu") is None  # the suite's pin: no bf16 flags
    monkeypatch.setattr(avr.fit, "cpu_bf16", lambda: {"avx512_bf16"})
    assert avr.fit.cpu_precision("cpu") == "bf16-mixed"
    assert avr.fit.cpu_precision("gpu") is None  # a GPU config names its precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert avr.fit.cpu_precision("auto") is None
    monkeypatch.undo()
    monkeypatch.setattr(avr.fit, "cpu_bf16", lambda: {"amx_bf16"})
    data = tmp_path / "data"
    build(data, 4, parse_mix("simple=1"), seed=0)
    common = ["experiments/sft.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
              "--data.init_args.path", str(data), "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "2", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    cli = fit(common)
    assert cli.trainer.precision == "bf16-mixed"
    assert "precision: bf16-mixed (this CPU has amx_bf16; --trainer.precision 32-true" in " ".join(
        capsys.readouterr().err.split()
    )
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    cli = fit([*common, "--trainer.precision", "32-true"])
    assert cli.trainer.precision == "32-true"
    assert "precision:" not in capsys.readouterr().err


@pytest.mark.slow
def test_rl_trains_and_logs_every_component(tmp_path, recwarn, caplog):
    fit(
        [
            "experiments/rl.yaml",
            "--trainer.max_steps",
            "2",
            f"--trainer.default_root_dir={tmp_path}",
            f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}',
            "--model.init_args.model",
            "null",
            "--model.init_args.group_size",
            "2",
            "--model.init_args.sampling.steps",
            "3",
            "--data.init_args.batch_size",
            "1",
        ]
    )
    # the frozen reference's eval mode and Lightning's hosted-logger tip are not worth a line
    assert not [w for w in recwarn if "module(s) in eval mode" in str(w.message)]
    assert "litlogger" not in caplog.text
    (metrics,) = Path(tmp_path).rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {
        "train/reward",
        "train/reward/compositional",
        "train/reward/format",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/text/ratio",
        "train/time/rollout",
    } <= logged
    assert len([r for r in rows if r.get("train/reward")]) == 2
    assert all(r["train/skipped_steps"] == "0.0" for r in rows if r.get("train/reward"))
    modes = [k for k in logged if k.startswith("train/mode/")]
    assert {k.split("/")[2] for k in modes} == {"simple", "medium", "complex"}  # every level
    for row in rows:  # every cell on every step: counts of this step's 2 rollouts
        if row.get("train/reward"):
            assert sum(float(row[k]) for k in modes) == 2
            # one group of 2: mixed exactly when its two rollouts took different modes
            took = {k.split("/")[3] for k in modes if float(row[k])}
            assert float(row["train/mixed_mode_groups"]) == float(len(took) == 2)


def test_sft_with_lora_and_activation_checkpointing_exports_merged_weights(tmp_path):
    data = tmp_path / "data"
    build(data, 8, parse_mix("simple=1,medium=1,complex=1"), seed=0)
    root = tmp_path / "run"
    fit(
        [
            "experiments/sft.yaml",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--data.init_args.path={data}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
            "--model.init_args.model.lora.r=4",
            "--model.init_args.model.lora.alpha=8",
            "--model.init_args.model.activation_checkpointing=true",
        ]
    )
    (checkpoint,) = Path(root).rglob("last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    layer = "backbone.lm.model.layers.2.self_attn.o_proj"
    b = state[f"{layer}.lora_B.default.weight"]
    assert b.abs().sum() > 0  # the adapters trained
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0
    model = from_pretrained(tmp_path / "export")
    merged = state[f"{layer}.base_layer.weight"] + 2.0 * b @ state[f"{layer}.lora_A.default.weight"]
    torch.testing.assert_close(model.lm.model.layers[2].self_attn.o_proj.weight, merged)
    start = tiny_model(0)  # sft.yaml: random init from seed 0; what LoRA freezes stays so
    assert torch.equal(model.lm.model.embed_tokens.weight, start.lm.model.embed_tokens.weight)
    assert not torch.equal(model.latent_in.weight, start.latent_in.weight)  # trained in full


def test_every_stage_of_the_tiny_recipe_is_a_config_file(capsys):
    """Each `avr.fit` run of `experiments/reproduce-tiny.sh` parses (`--print_config`), and its
    command line adds nothing of the recipe: only where outputs go and, for the RL seed curves,
    the seed."""
    script = Path("experiments/reproduce-tiny.sh").read_text(encoding="utf-8")
    commands = [
        shlex.split(line.split("python -m avr.fit", 1)[1])
        for line in script.replace("\\\n", " ").splitlines()
        if "python -m avr.fit" in line
    ]
    assert len(commands) >= 15
    allowed = {"--trainer.default_root_dir", "--seed_everything"} | {
        f"--{part}.init_args.seed" for part in ("model", "data")
    }
    for argv in commands:
        flags = [a for a in argv if a.startswith("--") and a != "--config"]
        assert set(flags) <= allowed, argv
        loops = {"$OUT": "runs/tiny", "$seed": "0", "$ablation": "no-penalty"}  # its variables
        for name, value in loops.items():
            argv = [a.replace(name, value) for a in argv]
        with pytest.raises(SystemExit):
            fit([*argv, "--print_config"])
        assert "max_steps" in capsys.readouterr().out
