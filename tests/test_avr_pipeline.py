"""`avr.Pipeline` and `avr generate`: a shipped model, from a prompt to its image and trajectory."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avr import Pipeline
from avr.sequence import ImageRole

PROMPT = "a photo of a yellow circle, a red triangle beneath the yellow circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("shapeworld-tiny-sft")


def test_a_call_returns_images_trajectories_compute_and_verdicts(pipe):
    out = pipe([PROMPT, "a dragon made of glass"], mode="plan", num_images_per_prompt=2, seed=3)
    assert len(out.images) == len(out.trajectories) == 4
    assert out.prompts == [PROMPT, PROMPT, "a dragon made of glass", "a dragon made of glass"]
    for image, trajectory in zip(out.images, out.trajectories, strict=True):
        assert image.size == (64, 64) and trajectory.final_image is image
        assert trajectory.segments[0].text == trajectory.meta["prompt"]
        assert trajectory.segments[1].text == "<mode:plan>"  # a forced mode opens with its token
        assert "<ins>" in [s.text for s in trajectory.segments if not s.is_image]
        assert {s.role for s in trajectory.images} <= {ImageRole.SKETCH, ImageRole.FINAL}
    assert all(n > 0 for n in out.nfe) and all(n > 0 for n in out.text_tokens)
    verdicts = out.verify()
    assert verdicts[2] is None and verdicts[3] is None  # generated, but nothing to judge against
    assert [c.clause.cls for c in verdicts[0].clauses] == ["circle", "triangle", "square"]
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_the_same_seed_gives_evaluate_s_image(pipe, tmp_path):
    from avr.evaluate import main as evaluate
    from avr.world.parse import parse_prompt

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(parse_prompt(PROMPT).to_line() + "\n")
    args = ["--model", "shapeworld-tiny-sft", "--prompts", str(prompts), "--modes", "reflect"]
    assert evaluate([*args, "--seed", "4", "-o", str(tmp_path / "e")]) == 0
    mine = pipe(PROMPT, mode="reflect", seed=4).images[0]
    from PIL import Image

    theirs = Image.open(tmp_path / "e" / "reflect" / "00000" / "samples" / "0000.png")
    assert np.array_equal(np.asarray(mine), np.asarray(theirs.convert("RGB")))


def test_bad_arguments_are_named(pipe):
    with pytest.raises(ValueError, match="prompt: expected a non-empty string"):
        pipe("  ")
    with pytest.raises(ValueError, match="num_images_per_prompt: expected ≥ 1"):
        pipe(PROMPT, num_images_per_prompt=0)
    with pytest.raises(LookupError, match="no-such-mode"):
        pipe(PROMPT, mode="no-such-mode")


@pytest.mark.slow
def test_generate_writes_the_images_their_trajectory_strips_and_refuses_to_replace(tmp_path):
    out = tmp_path / "images" / "out.png"
    command = [sys.executable, "-m", "avr.cli", "generate", PROMPT, "--mode", "reflect",
               "--model", "shapeworld-tiny-sft", "--num-images", "2", "--steps", "2", "-o", str(out),
               "--show-trajectory"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "out_0_0.png",
        "out_0_0.trajectory.png",
        "out_0_1.png",
        "out_0_1.trajectory.png",
    ]
    assert done.stdout.count("<mode:reflect>") == 2 and "[draft image]" in done.stdout
    assert "velocity evaluations" in done.stdout and "verifier: " in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "out_0_0.png: exists; choose another -o" in again.stderr


def test_a_folder_s_generation_config_is_the_pipeline_s_default(tmp_path):
    import shutil

    from avr.backbone.io import SHIPPED
    from avr.cards import read_generation_config, write_generation_config

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED / "shapeworld-tiny-sft", folder)
    write_generation_config(folder, mode="direct", num_inference_steps=3)
    pipe = Pipeline.from_pretrained(folder)
    out = pipe("a red circle")
    assert out.trajectories[0].segments[1].text == "<mode:direct>" and out.nfe == [3]
    assert pipe("a red circle", num_inference_steps=4).nfe == [4]  # a call's setting wins
    for text, message in (
        ('{"steps": 3}', "unknown key 'steps'; expected some of mode, num_inference_steps"),
        ('{"num_inference_steps": "3"}', "num_inference_steps must be an integer, got '3'"),
        ("[1]", "expected a JSON object of sampler settings"),
        ("{", "not valid JSON"),
    ):
        (folder / "generation_config.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_generation_config(folder)


def test_a_hub_id_loads_from_the_local_cache_and_never_downloads(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from avr.backbone.io import SHIPPED, resolve_model_dir

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--someone--tiny-shapes"
    shutil.copytree(SHIPPED / "shapeworld-tiny-sft", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert resolve_model_dir("someone/tiny-shapes") == repo / "snapshots" / "0123abcd"
    out = Pipeline.from_pretrained("someone/tiny-shapes")("a red circle", mode="direct")
    assert len(out.images) == 1
    assert resolve_model_dir("someone/not-cached") == Path("someone/not-cached")  # named, as given


def test_the_pipeline_runs_every_registered_backbone():
    from avr.backbone.protocol import backbones
    from avr.defaults import tiny_janus

    assert set(backbones()) == {"unified", "janus"}  # a new backbone belongs in this test too
    backbone = tiny_janus(0)  # tiny, random
    out = Pipeline(backbone)(["a red circle", "two squares"], mode="reflect", max_text_tokens=8)
    assert [image.size for image in out.images] == [(64, 64), (64, 64)]
    assert all(t.segments[1].text == "<mode:reflect>" for t in out.trajectories)
