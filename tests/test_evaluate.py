import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avr.backbone import save_pretrained
from avr.defaults import tiny_model
from avr.evaluate import main
from avr.sequence import record_to_trajectory
from avr.world import TAGS, sample_specs, save_specs
from avr.world.split import is_held_out


def test_evaluate_writes_geneval_layout_metrics_and_report(tmp_path, capsys):
    save_pretrained(tiny_model(0), tmp_path / "model")
    save_specs(sample_specs(8, seed=0), tmp_path / "prompts.jsonl")
    out = tmp_path / "eval"
    code = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--modes",
            "direct,adaptive",
            "--steps",
            "2",
            "--max-text-tokens",
            "4",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"direct", "adaptive"}
    direct = metrics["runs"]["direct"]
    assert set(direct["by_tag"]) == set(TAGS) and direct["per_prompt"]["nfe"] == 2.0
    assert (out / "direct" / "00007" / "samples" / "0000.png").is_file()
    assert len((out / "adaptive" / "results.jsonl").read_text().splitlines()) == 8
    report = (out / "report.md").read_text()
    assert "overall (mean over tags)" in report and "heldout: exact" in report
    # every accuracy with its interval, and the two modes compared on the same prompts
    low, high = direct["interval"]["overall"]
    assert 0.0 <= low <= direct["overall"] <= high <= 1.0
    assert set(direct["interval"]["by_level"]) == set(direct["by_level"])
    assert len(direct["correct"]) == 8
    (comparison,) = metrics["paired"]
    assert (comparison["a"], comparison["b"], comparison["prompts"]) == ("direct", "adaptive", 8)
    assert "Paired comparisons on the same prompts" in report
    fidelity = direct["fidelity"]
    held = sum(is_held_out(s) for s in sample_specs(8, seed=0))
    assert 0 < held < 8  # both groups occur, and are reported apart
    assert set(fidelity) == {"all", "seen", "heldout"}
    assert fidelity["all"]["asked_per_image"] == np.mean(
        [sum(c.count for c in s.include) for s in sample_specs(8, seed=0)]
    )
    assert "keep what the one before" in report
    # every image's outcome counted once, under its prompt's level
    outcomes = direct["outcomes"]
    assert sum(o["images"] for o in outcomes.values()) == 8
    exact = sum(o["exact"] * o["images"] for o in outcomes.values()) / 8
    assert exact == pytest.approx(fidelity["all"]["exact"])
    assert "What decided each final image" in report and "simple: blank" in report
    assert "report:" in capsys.readouterr().out
    for plot in ("accuracy_vs_compute.png", "accuracy_by_level.png", "direct/trajectories.png"):
        with Image.open(out / plot) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    lines = (out / "adaptive" / "trajectories" / "trajectories.jsonl").read_text().splitlines()
    trajectories = [
        record_to_trajectory(json.loads(line), out / "adaptive" / "trajectories", "", check=False)
        for line in lines  # a random model's text need not balance its tags
    ]
    assert len(trajectories) == 8 and all(t.meta["prompt"] for t in trajectories)
    builds = metrics["runs"]["adaptive"]["builds_on"]  # one step per image after the first
    later = sum(max(0, len([s for s in t.images if s.role.generated]) - 1) for t in trajectories)
    assert builds["steps"] + builds["empty"] == later
    assert trajectories[0].segments[0].text == trajectories[0].meta["prompt"]


def test_evaluate_compares_named_models_in_one_report(tmp_path, capsys):
    for seed in (0, 1):
        save_pretrained(tiny_model(seed), tmp_path / f"m{seed}")
    save_specs(sample_specs(2, seed=0), tmp_path / "prompts.jsonl")
    base = ["--prompts", str(tmp_path / "prompts.jsonl"), "--modes", "direct", "--steps", "1"]
    models = ["--model", f"sft={tmp_path / 'm0'}", "--model", f"rl={tmp_path / 'm1'}"]
    assert main([*base, *models, "-o", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["sft/direct", "rl/direct"]
    assert metrics["runs"]["rl/direct"]["model"] == "rl"
    assert (tmp_path / "eval" / "rl" / "direct" / "00001" / "samples" / "0000.png").is_file()
    # the same runs in two worker processes: the same rollouts, so the same scores and compute
    assert main([*base, *models, "--workers", "2", "-o", str(tmp_path / "par")]) == 0
    parallel = json.loads((tmp_path / "par" / "metrics.json").read_text())
    for label, run in metrics["runs"].items():
        other = parallel["runs"][label]
        assert (other["overall"], other["by_tag"]) == (run["overall"], run["by_tag"])
        assert other["per_prompt"]["nfe"] == run["per_prompt"]["nfe"]
    image = Path("rl", "direct", "00001", "samples", "0000.png")
    with Image.open(tmp_path / "eval" / image) as a, Image.open(tmp_path / "par" / image) as b:
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1  # thread counts
    twice = ["--model", f"a={tmp_path / 'm0'}", "--model", f"a={tmp_path / 'm1'}"]
    assert main([*base, *twice, "-o", str(tmp_path / "o")]) == 2
    assert "the name 'a' is given twice" in capsys.readouterr().err


def test_the_sampler_shift_reaches_the_rollouts(tmp_path, capsys):
    save_pretrained(tiny_model(0), tmp_path / "m")
    save_specs(sample_specs(2, seed=0), tmp_path / "p.jsonl")
    base = ["--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.jsonl")]
    base += ["--modes", "direct", "--steps", "3"]
    pixels = {}
    for shift in (1, 3):
        assert main([*base, "--shift", str(shift), "-o", str(tmp_path / f"s{shift}")]) == 0
        metrics = json.loads((tmp_path / f"s{shift}" / "metrics.json").read_text())
        assert metrics["sampling"]["shift"] == shift
        with Image.open(tmp_path / f"s{shift}" / "direct" / "00000" / "samples" / "0000.png") as im:
            pixels[shift] = np.asarray(im, float)
    assert np.abs(pixels[1] - pixels[3]).mean() > 1  # another schedule, another image
    assert main([*base, "--shift", "0", "-o", str(tmp_path / "bad")]) == 2
    assert "--shift: expected > 0, got 0.0" in capsys.readouterr().err
    assert main([*base, "--cfg-scale", "-1", "-o", str(tmp_path / "bad")]) == 2
    assert "--cfg-scale: expected ≥ 0 (1: no guidance), got -1.0" in capsys.readouterr().err


def test_evaluate_refuses_unknown_modes_and_foreign_prompts(tmp_path, capsys, pytestconfig):
    geneval = pytestconfig.rootpath / "tests/fixtures/geneval_metadata_sample.jsonl"
    assert (
        main(["--model", str(tmp_path), "--prompts", str(geneval), "-o", str(tmp_path / "o")]) == 2
    )
    assert (
        "geneval_metadata_sample.jsonl:1: class 'bench' is not in ShapeWorld's vocabulary"
        in capsys.readouterr().err
    )
    save_specs(sample_specs(1), tmp_path / "p.jsonl")
    assert (
        main(
            [
                "--model",
                str(tmp_path),
                "--prompts",
                str(tmp_path / "p.jsonl"),
                "--modes",
                "draw",
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "unknown mode 'draw'" in capsys.readouterr().err


def test_best_of_n_counts_every_sample_and_never_loses_to_its_first(tmp_path, capsys):
    """On the committed t2i model (which gets some single-object prompts right)."""
    save_specs(sample_specs(8, ["single_object", "colors"], seed=2), tmp_path / "prompts.jsonl")
    model = Path(__file__).parents[1] / "checkpoints" / "shapeworld-tiny-t2i"
    base = ["--model", str(model), "--prompts", str(tmp_path / "prompts.jsonl"), "--steps", "4"]
    assert main([*base, "--modes", "direct,direct*3", "-o", str(tmp_path / "eval")]) == 0
    runs = json.loads((tmp_path / "eval" / "metrics.json").read_text())["runs"]
    direct, best = runs["direct"], runs["direct*3"]
    assert best["per_prompt"]["nfe"] == 3 * direct["per_prompt"]["nfe"]
    # its first sample is the direct run's own rollout, so it is right wherever direct is
    assert sum(direct["correct"]) >= 1
    assert all(b >= d for b, d in zip(best["correct"], direct["correct"], strict=True))
    for bad in ("direct*1", "direct*x"):
        assert main([*base, "--modes", bad, "-o", str(tmp_path / bad)]) == 2
        assert "best-of needs NAME*N with an integer N ≥ 2" in capsys.readouterr().err


def test_intervals_and_paired_comparisons():
    from avr.intervals import overall_interval, paired, wilson

    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    tags = ["a"] * 20 + ["b"] * 20
    a = [1] * 10 + [0] * 10 + [1] * 5 + [0] * 15  # overall (0.5 + 0.25) / 2
    low, high = overall_interval(a, tags)
    assert low < 0.375 < high and high - low < 0.5
    for n in (3, 40):  # no success (or no failure) at all: Wilson's interval, never a point
        assert overall_interval([0] * n, ["a"] * n) == pytest.approx(wilson(0, n))
        assert overall_interval([1] * n, ["a", "b"] * (n // 2) + ["a"] * (n % 2)) == (
            pytest.approx(wilson(n, n))
        )
        assert overall_interval([0] * n, ["a"] * n)[1] > 0.05
    same = paired(a, a, tags)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and same["mcnemar_p"] == 1
    b = [1] * 20 + [1] * 5 + [0] * 15  # b also gets the 10 prompts a missed in tag "a"
    better = paired(a, b, tags)
    assert (better["only_a"], better["only_b"]) == (0, 10)
    assert better["difference"] == pytest.approx(0.25) and better["interval"][0] > 0
    assert better["mcnemar_p"] == pytest.approx(2 * 0.5**10)
    with pytest.raises(ValueError, match="the same prompts"):
        paired(a, b[:-1], tags)


def test_runs_on_the_same_point_are_labelled_once_together():
    from avr.report import point_labels

    def run(nfe, overall):
        return {"per_prompt": {"nfe": nfe}, "overall": overall}

    runs = {"direct": run(10.0, 0.25), "adaptive-no-plan": run(10.0, 0.25), "plan": run(21.0, 0.3)}
    assert point_labels(runs, "nfe") == {
        (10.0, 25.0): ["direct", "adaptive-no-plan"],
        (21.0, 30.0): ["plan"],
    }


@pytest.mark.slow
def test_evaluate_shows_progress_per_run_unless_quiet(tmp_path):
    import re
    import subprocess
    import sys

    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "3", "-o", str(prompts)]) == 0
    command = [sys.executable, "-m", "avr.evaluate", "--model", "shapeworld-tiny-sft", "--prompts",
               str(prompts), "--modes", "direct,reflect", "--batch", "2", "--steps", "2"]  # fmt: skip
    done = subprocess.run([*command, "-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("direct", "reflect"):  # a bar per run, ending on every prompt
        assert re.search(rf"{label} .*100% 3/3", done.stderr), done.stderr
    quiet = [*command, "--quiet", "-o", str(tmp_path / "b")]
    done = subprocess.run(quiet, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
