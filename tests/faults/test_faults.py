"""Fault injection: bad input and faults a realistic user meets, each ending in a clear error that
names the file, line or key (or a documented, counted skip), never in silent loss or a wrong
result. One test per fault; the README's reliability section lists them."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from avr.data.build import build, parse_mix
from avr.data.datamodule import TrajectoryStream
from avr.sequence import TrajectoryError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d"
    build(out, 12, parse_mix("simple=1,medium=1"), seed=5, shard_size=6)
    return out


def _copy(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    return broken


def _first_image(root) -> str:
    record = json.loads((root / "shard-00000.jsonl").read_text().splitlines()[0])
    return next(s["image"] for s in record["segments"] if s["type"] == "image")


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


# ---- data: every fault names shard:line, and skip_invalid skips it --------------------------------


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("wrong_size_png", r"shard-00000\.jsonl:1: segments\[\d\]: a 32×16 image where manifest\.json says 64×64"),
        ("non_utf8_line", r"shard-00000\.jsonl:1: not UTF-8 \(byte 0xff at column 1\)"),
        ("short_shard", r"shard-00000\.jsonl:6: missing: the shard has 5 lines"),
    ],
)  # fmt: skip
def test_a_data_fault_names_its_shard_line_and_can_be_skipped(dataset, tmp_path, fault, message):
    broken = _copy(dataset, tmp_path)
    shard = broken / "shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    if fault == "wrong_size_png":
        Image.new("RGB", (32, 16), "white").save(broken / _first_image(broken))
    elif fault == "non_utf8_line":
        shard.write_bytes(b"\xff" + b"".join(lines)[1:])
    else:
        shard.write_bytes(b"".join(lines[:5]))
    if fault != "wrong_size_png":  # an edited shard fails its checksum first
        with pytest.raises(TrajectoryError, match=r"shard-00000\.jsonl: its SHA-256 is not"):
            _take(TrajectoryStream(broken, batch_size=12, shuffle=False), 1)
        manifest = json.loads((broken / "manifest.json").read_text())
        for entry in manifest["shards"]:  # as data built before checksums: read line by line
            del entry["sha256"]
        (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=message):
        _take(TrajectoryStream(broken, batch_size=12, shuffle=False), 1)
    (batch,) = _take(TrajectoryStream(broken, batch_size=12, shuffle=False, skip_invalid=True), 1)
    assert len(batch) == 11  # the bad record skipped, the rest kept


def test_data_build_replaces_only_an_earlier_data_folder(tmp_path, capsys):
    from avr.data.__main__ import main as data

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"the run's checkpoint")
    args = ["build", "--n", "2", "--mix", "simple=1", "--mode", "direct"]
    assert data([*args, "-o", str(run)]) == 2
    assert "run: exists; a data build writes a new folder" in capsys.readouterr().err
    assert data([*args, "-o", str(run), "--overwrite"]) == 2
    assert "not an earlier output of `avr data`" in capsys.readouterr().err
    assert (run / "last.ckpt").read_bytes() == b"the run's checkpoint"
    out = tmp_path / "d"
    assert data([*args, "-o", str(out)]) == 0
    assert data([*args, "--n", "3", "-o", str(out)]) == 2
    assert data([*args, "--n", "3", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["n"] == 3
    assert data([*args[:2], "0", *args[3:], "-o", str(tmp_path / "none")]) == 2
    assert "--n: expected ≥ 1 trajectories, got 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "run"]  # no staging folder left


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("deleted_shard", r"shard-00001\.jsonl: missing, though manifest\.json lists it"),
        ("truncated_manifest", r"manifest\.json:\d+: not a valid manifest"),
    ],
)
def test_a_damaged_manifest_is_an_error_naming_it(dataset, tmp_path, fault, message):
    broken = _copy(dataset, tmp_path)
    if fault == "deleted_shard":
        (broken / "shard-00001.jsonl").unlink()
    else:
        manifest = broken / "manifest.json"
        manifest.write_text(manifest.read_text()[:200])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        TrajectoryStream(broken, batch_size=4)


def test_a_shard_from_another_build_fails_its_checksum(dataset, tmp_path):
    broken = _copy(dataset, tmp_path)
    other = tmp_path / "other"
    build(other, 12, parse_mix("simple=1,medium=1"), seed=6, shard_size=6)
    shutil.copy(other / "shard-00001.jsonl", broken / "shard-00001.jsonl")  # same size, same names
    with pytest.raises(TrajectoryError, match=r"shard-00001\.jsonl: its SHA-256 is not the one"):
        _take(TrajectoryStream(broken, batch_size=12, shuffle=False), 1)
    stream = TrajectoryStream(broken, batch_size=12, shuffle=False, skip_invalid=True)
    (batch,) = _take(stream, 1)
    assert len(batch) == 6  # the foreign shard's records skipped, none trained on
    first, second = (json.loads((p / "manifest.json").read_text()) for p in (dataset, other))
    assert first["build_id"] != second["build_id"]


def test_a_checkpoint_resumes_only_its_own_module_model_and_data(dataset, tmp_path):
    from avr.data.datamodule import ResumeError, TrajectoryDataModule
    from avr.lit.base import ModelSettings
    from avr.lit.rl import RLModule
    from avr.lit.sft import SFTModule

    checkpoint: dict = {}
    SFTModule().on_save_checkpoint(checkpoint)
    with pytest.raises(ResumeError, match="a SFTModule checkpoint cannot resume a RLModule run"):
        RLModule().on_load_checkpoint(checkpoint)
    SFTModule().on_load_checkpoint(checkpoint)  # its own kind resumes
    sft = SFTModule(seed=3)  # the way to start RL from it instead: model.path names the .ckpt
    torch.save({**checkpoint, "state_dict": sft.state_dict()}, tmp_path / "sft.ckpt")
    rl = RLModule(model=ModelSettings(path=str(tmp_path / "sft.ckpt")))
    trained = sft.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in rl.backbone.state_dict().items())
    config = json.loads(checkpoint["avr_backbone"]["config"])
    checkpoint["avr_backbone"]["config"] = json.dumps({**config, "patch_size": 99})
    with pytest.raises(ResumeError, match=r"model differs from this run's \(patch_size: 99 there"):
        SFTModule().on_load_checkpoint(checkpoint)
    state = TrajectoryDataModule(str(dataset)).state_dict()
    rebuilt = tmp_path / "rebuilt"
    build(rebuilt, 12, parse_mix("simple=1,medium=1"), seed=5, shard_size=6)  # the same command
    TrajectoryDataModule(str(rebuilt)).load_state_dict(state)  # the same data: resumes
    other = tmp_path / "other"
    build(other, 12, parse_mix("simple=1,medium=1"), seed=7, shard_size=6)
    with pytest.raises(ResumeError, match=r"trained on data build \w{16}, and \S+other now holds"):
        TrajectoryDataModule(str(other)).load_state_dict(state)
    TrajectoryDataModule(str(dataset)).load_state_dict(state)


def test_fit_names_a_ckpt_path_that_is_not_a_checkpoint_of_the_run(tmp_path):
    import subprocess
    import sys

    from avr.lit.sft import SFTModule

    checkpoint: dict = {"state_dict": {}, "pytorch-lightning_version": "2.6.0"}
    SFTModule().on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "sft.ckpt")
    base = [sys.executable, "-m", "avr.fit", "experiments/rl.yaml", "--model.init_args.model",
            "null", "--trainer.max_steps", "1", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    for path, message in (
        (tmp_path / "nothing.ckpt", "nothing.ckpt: no such file"),
        (tmp_path, "a folder; give the checkpoint file in it"),
        (tmp_path / "sft.ckpt", "a SFTModule checkpoint cannot resume a RLModule run"),
    ):
        done = subprocess.run([*base, f"--ckpt_path={path}"], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_skip_invalid_stops_when_every_record_is_invalid(dataset, tmp_path):
    broken = _copy(dataset, tmp_path)
    for shard in broken.glob("shard-*.jsonl"):
        shard.write_text("not json\n" * len(shard.read_text().splitlines()))
    stream = TrajectoryStream(broken, batch_size=4, shuffle=False, skip_invalid=True)
    with pytest.raises(TrajectoryError, match=r"12 invalid records in a row.*nothing to train on"):
        _take(stream, 1)


# ---- output folders: leftovers are never scored as this run's ------------------------------------


def test_render_and_evaluate_refuse_a_non_empty_output_folder(tmp_path, capsys):
    from avr.evaluate import main as evaluate
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "3", "--seed", "1", "-o", str(prompts)]) == 0
    out = tmp_path / "out"
    assert world(["render", str(prompts), "-o", str(out)]) == 0
    one = tmp_path / "one.jsonl"
    one.write_text(prompts.read_text().splitlines()[0] + "\n")
    assert world(["render", str(one), "-o", str(out)]) == 2
    assert "out: the output folder is not empty (4 entries" in capsys.readouterr().err
    assert world(["render", str(one), "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".avr-output", "00000"]  # leftovers gone
    model = "checkpoints/shapeworld-tiny-sft"
    args = ["--model", model, "--prompts", str(one), "--modes", "direct", "--steps", "1"]
    assert evaluate([*args, "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert evaluate([*args, "-o", str(out), "--overwrite"]) == 2  # render's folder, not evaluate's
    assert "not an earlier output of `avr evaluate`" in capsys.readouterr().err
    evaluated = tmp_path / "evaluated"
    assert evaluate(["--model", model, "--prompts", str(prompts), "--modes", "direct", "--steps",
                     "1", "-o", str(evaluated)]) == 0  # fmt: skip
    assert evaluate([*args, "-o", str(evaluated)]) == 2
    assert evaluate([*args, "-o", str(evaluated), "--overwrite"]) == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["prompts"] == 1 and len(list((evaluated / "direct").glob("0*"))) == 1


def test_overwrite_empties_only_an_earlier_output_of_the_same_tool(tmp_path, capsys, monkeypatch):
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "2", "--seed", "1", "-o", str(prompts)]) == 0
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    cases = {  # output → what --overwrite must say, and leave untouched
        "..": "holds the working directory",
        str(tmp_path): "holds the working directory",
        str(tmp_path / "work" / "sub"): "holds the working directory",
    }
    inside = tmp_path / "has-input"
    inside.mkdir()
    shutil.copy(prompts, inside / "p.jsonl")
    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "last.ckpt").write_text("a checkpoint")
    evaluated = tmp_path / "evaluated"
    assert world(["render", str(prompts), "-o", str(evaluated)]) == 0
    (evaluated / ".avr-output").write_text('{"tool": "avr evaluate"}')
    for out, message in cases.items():
        assert world(["render", str(prompts), "-o", out, "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert world(["render", str(inside / "p.jsonl"), "-o", str(inside), "--overwrite"]) == 2
    assert "holds this command's input" in capsys.readouterr().err
    for out, tool in ((foreign, "avr world render"), (evaluated, "avr world render")):
        assert world(["render", str(prompts), "-o", str(out), "--overwrite"]) == 2
        assert f"not an earlier output of `{tool}`" in capsys.readouterr().err
    assert (foreign / "last.ckpt").read_text() == "a checkpoint"
    assert (inside / "p.jsonl").is_file() and prompts.is_file()
    assert (work / "notes.txt").read_text() == "mine"


def test_evaluate_writes_only_inside_its_output_folder(tmp_path, capsys, monkeypatch):
    from avr.evaluate import main as evaluate
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "1", "--seed", "1", "-o", str(prompts)]) == 0
    model = Path("checkpoints/shapeworld-tiny-sft").resolve()
    args = ["--prompts", str(prompts), "--modes", "direct", "--steps", "1"]
    for names, message in (
        (["..=" + str(model), "b=" + str(model)], "the name '..' must be a plain folder name"),
        (["/x=" + str(model), "b=" + str(model)], "the name '/x' must be a plain folder name"),
    ):
        assert evaluate([f"--model={m}" for m in names] + [*args, "-o", str(tmp_path / "e")]) == 2
        assert message in capsys.readouterr().err
    assert (
        evaluate(["--model", str(model), *args[:2], "--modes", " , ", "-o", str(tmp_path / "e")])
        == 2
    )
    assert "--modes ' , ': names no mode" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before anything was written
    monkeypatch.chdir(model)  # `--model .` beside another model: named by its folder, not ''
    out = tmp_path / "two"
    assert evaluate(["--model", ".", "--model", f"b={model}", *args, "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["b", "shapeworld-tiny-sft"]


def test_counts_and_sizes_below_their_minimum_are_refused(tmp_path, capsys):
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "2", "-o", str(prompts)]) == 0
    for args, message in (
        (["prompts", "--n", "0", "-o", str(tmp_path / "none.jsonl")], "--n: expected at least 1, got 0"),
        (["render", str(prompts), "--per-prompt", "0", "-o", str(tmp_path / "r")], "--per-prompt: expected at least 1"),
        (["render", str(prompts), "--resolution", "8", "-o", str(tmp_path / "r")], "--resolution: expected at least 16, got 8"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            world(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # nothing written


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "JSON nested too deeply to be a prompt"),
        ('{"tag": "counting", "prompt": "x", "include": [{"class": "circle", "count": '
         + "9" * 5000 + "}]}", "a number of 5000 digits; at most 9"),
    ],
)  # fmt: skip
def test_an_unbounded_prompt_line_is_an_error_naming_it(tmp_path, capsys, line, message):
    from avr.world.__main__ import main as world

    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(line + "\n")
    assert world(["render", str(prompts), "-o", str(tmp_path / "r")]) == 2
    assert f"bad.jsonl:1: {message}" in capsys.readouterr().err


def test_an_empty_prompt_file_is_an_error(tmp_path, capsys):
    from avr.evaluate import main as evaluate
    from avr.world.__main__ import main as world

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert world(["render", str(empty), "-o", str(tmp_path / "r")]) == 2
    assert "empty.jsonl: holds no prompts" in capsys.readouterr().err
    model = "checkpoints/shapeworld-tiny-sft"
    assert evaluate(["--model", model, "--prompts", str(empty), "-o", str(tmp_path / "e")]) == 2
    assert "empty.jsonl: holds no prompts" in capsys.readouterr().err


# ---- scoring: nothing dropped silently, nothing unreadable scored -----------------------------


@pytest.fixture
def rendered(tmp_path):
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "3", "--tags", "single_object", "-o", str(prompts)]) == 0
    assert world(["render", str(prompts), "-o", str(tmp_path / "out")]) == 0
    return tmp_path / "out"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("no_samples_folder", r"00001/samples: no PNG images"),
        ("jpeg", r"00001/samples/0000\.jpg: a JPEG file; samples must be PNG"),
        ("zero_byte", r"00001/samples/0000\.png: not a readable image"),
        ("truncated", r"00001/samples/0000\.png: not a readable image"),
        ("folder_named_png", r"00001/samples/0000\.png: not a file"),
        ("seven_px", r"00001/samples/0000\.png: a 7×7 image; samples must be square"),
        ("not_square", r"00001/samples/0000\.png: a 64×32 image; samples must be square"),
        ("huge", r"00001/samples/0000\.png: a 10000×10000 image; at most 4096 px a side is read"),
        (
            "bomb",
            r"00001/samples/0000\.png: not a readable image \(Image size \(400000000 pixels\)",
        ),
    ],
)
def test_score_names_a_missing_or_unreadable_image_or_counts_it(rendered, fault, message, capsys):
    from avr.world.__main__ import main as world

    samples = rendered / "00001" / "samples"
    png = samples / "0000.png"
    if fault == "no_samples_folder":
        shutil.rmtree(samples)
    elif fault == "jpeg":
        Image.open(png).convert("RGB").save(samples / "0000.jpg", "JPEG")
        png.unlink()
    elif fault == "zero_byte":
        png.write_bytes(b"")
    elif fault == "truncated":
        png.write_bytes(png.read_bytes()[:60])
    elif fault == "folder_named_png":
        png.unlink()
        png.mkdir()
    elif fault in ("huge", "bomb"):  # a few KB on disk, gigabytes decoded
        side = 10000 if fault == "huge" else 20000
        Image.new("1", (side, side)).save(png)
    else:
        Image.new("RGB", (7, 7) if fault == "seven_px" else (64, 32), "white").save(png)
    assert world(["score", str(rendered)]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert world(["score", str(rendered), "--allow-missing"]) == 0
    printed = capsys.readouterr().out
    assert "1 missing or unreadable images counted as failures" in printed
    records = [json.loads(line) for line in (rendered / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 and sum(r["correct"] for r in records) == 2  # counted, not dropped


def test_score_refuses_a_folder_with_a_missing_prompt(rendered, capsys):
    from avr.world.__main__ import main as world

    shutil.rmtree(rendered / "00001")
    for flags in ([], ["--allow-missing"]):  # its spec is gone: it cannot even count as failed
        assert world(["score", str(rendered), *flags]) == 2
        assert "00001: missing; prompt folders must run 00000 to 00002 without a gap" in (
            capsys.readouterr().err
        )
    assert not (rendered / "results.jsonl").exists()


def test_a_fully_transparent_image_is_a_blank_canvas_not_a_match(rendered):
    from avr.world.geneval import score_folder

    png = rendered / "00000" / "samples" / "0000.png"
    drawn = Image.open(png).convert("RGBA")
    assert score_folder(rendered)[0]["correct"] is True
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(png)
    assert score_folder(rendered)[0]["correct"] is False
    drawn.save(png)  # the same image with an opaque alpha channel scores as the RGB one
    assert score_folder(rendered)[0]["correct"] is True


# ---- checkpoints: whole or absent, wherever TMPDIR points -------------------------------------


def test_a_checkpoint_is_written_beside_its_destination_not_in_tmpdir(tmp_path, monkeypatch):
    import tempfile

    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from avr.lit.checkpointing import AtomicCheckpointIO

    state = {"w": torch.arange(1000.0)}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))  # TMPDIR elsewhere
    with pytest.raises(OSError):  # Lightning's writer stages the file in TMPDIR
        TorchCheckpointIO().save_checkpoint(state, tmp_path / "lightning.ckpt")
    target = tmp_path / "ckpt" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(state, target)
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["w"], state["w"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_save_killed_midway_leaves_the_old_checkpoint_and_no_leftovers(tmp_path, monkeypatch):
    import torch

    from avr.lit import checkpointing
    from avr.lit.checkpointing import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the run is stopped during the write

    monkeypatch.setattr(checkpointing.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / ".epoch=0-step=9.ckpt.tmp-4242").write_bytes(b"left by a SIGKILL")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # cleaned at the next save


# ---- prompt files ----------------------------------------------------------------------------

GOOD = '{"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (GOOD.replace('"tag": "single_object",', '"tag": "single_object", "tag": "colors",'),
         r"p\.jsonl:2: key 'tag' appears twice in one object"),
        (GOOD.replace('"count": 1', '"count": 9'),
         r"p\.jsonl:2: asks for 9 objects; ShapeWorld draws at most MAX_OBJECTS = 8"),
        (GOOD.replace("]}", '], "exclude": [{"class": "circle", "count": 1}]}'),
         r"p\.jsonl:2: exclude\[0\] forbids 1 or more circle, but include\[0\] asks for 1"),
    ],
)  # fmt: skip
def test_a_bad_prompt_line_is_an_error_naming_file_and_line(tmp_path, capsys, line, message):
    from avr.evaluate import main as evaluate
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(GOOD + "\n" + line + "\n")
    assert world(["render", str(prompts), "-o", str(tmp_path / "r")]) == 2
    assert re.search(message, capsys.readouterr().err)
    model = "checkpoints/shapeworld-tiny-sft"
    assert evaluate(["--model", model, "--prompts", str(prompts), "-o", str(tmp_path / "e")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(
        GOOD.encode() + b"\n" + GOOD.replace("circle", "c\xe9rcle").encode("latin-1") + b"\n"
    )
    assert world(["render", str(prompts), "-o", str(tmp_path / "r")]) == 2
    assert re.search(r"p\.jsonl:2: not UTF-8 \(byte 0xe9 at column \d+\)", capsys.readouterr().err)


# ---- model folders and checkpoints: errors that name the file and the key ---------------------

SHIPPED = "checkpoints/shapeworld-tiny-sft"


def _damaged(tmp_path, fault):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    if fault == "truncated_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100_000])
    elif fault == "config_is_a_list":
        (folder / "config.json").write_text("[1, 2]")
    elif fault == "image_size_is_a_word":
        config["image_size"] = "sixty-four"
    elif fault == "hidden_size_changed":
        config["lm"]["hidden_size"] = 256
    elif fault == "unknown_lm_key":
        config["lm"]["hiden_size"] = 256
    elif fault == "garbage_tokenizer":
        (folder / "tokenizer" / "tokenizer.json").write_text("garbage")
    elif fault == "no_tokenizer":
        (folder / "tokenizer" / "tokenizer.json").unlink()
    if fault in ("image_size_is_a_word", "hidden_size_changed", "unknown_lm_key"):
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("truncated_weights", r"model\.safetensors: not a complete safetensors file"),
        ("config_is_a_list", r"config\.json: expected a JSON object of config keys, got list"),
        ("image_size_is_a_word", r"config\.json: config key 'image_size': expected int, got 'sixty-four'"),
        ("hidden_size_changed", r"model\.safetensors: the weights do not fit .*config\.json: size mismatch for \S+: .* \(and \d+ more\)"),
        ("unknown_lm_key", r"config\.json: config key 'lm': Qwen2Config has no key 'hiden_size' \(did you mean 'hidden_size'\?\)"),
        ("garbage_tokenizer", r"tokenizer/tokenizer\.json: not a readable `tokenizers` file"),
        ("no_tokenizer", r"tokenizer/tokenizer\.json: missing"),
    ],
)  # fmt: skip
def test_a_damaged_model_folder_is_a_clear_error(tmp_path, fault, message):
    from avr.backbone import from_pretrained

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        from_pretrained(_damaged(tmp_path, fault))


@pytest.mark.parametrize("fault", ["zero_byte", "pickled"])
def test_export_refuses_an_empty_or_pickled_checkpoint_with_exit_2(tmp_path, fault, capsys):
    import collections

    import torch

    from avr.export import main as export

    checkpoint = tmp_path / "bad.ckpt"
    if fault == "zero_byte":
        checkpoint.write_bytes(b"")
    else:  # a Python object that weights_only refuses: loading it would run pickled code
        torch.save({"state_dict": collections.Counter(a=1), "hook": print}, checkpoint)
    assert export([str(checkpoint), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "bad.ckpt: not a checkpoint that loads without pickle" in error
    assert "weights_only=False" not in error and not (tmp_path / "out").exists()


def test_export_never_replaces_a_folder_holding_anything_but_a_model(tmp_path, capsys, monkeypatch):
    from avr.export import main as export

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"the run's checkpoint")
    a_file = tmp_path / "model.txt"
    a_file.write_text("mine")
    monkeypatch.chdir(run)
    for out, message in (
        (str(run), "holds the working directory"),
        (".", "holds the working directory"),
        (str(a_file), "model.txt: the output must be a folder, and this is a file"),
    ):
        assert export([str(run / "last.ckpt"), "-o", out]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert export([str(run / "last.ckpt"), "-o", str(run)]) == 2
    assert "run: holds files a model save does not write (last.ckpt)" in capsys.readouterr().err
    assert (
        run / "last.ckpt"
    ).read_bytes() == b"the run's checkpoint" and a_file.read_text() == "mine"


def test_save_pretrained_replaces_an_earlier_save_and_nothing_else(tmp_path):
    from avr.backbone import from_pretrained
    from avr.defaults import tiny_model

    out = tmp_path / "model"
    tiny_model(0).save_pretrained(out)
    tiny_model(1).save_pretrained(out)  # an earlier save alone: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it
    reloaded = from_pretrained(out).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in tiny_model(1).state_dict().items())
    (out / "RECIPE.md").write_text("how it was trained")  # a model card is kept
    tiny_model(0).save_pretrained(out)
    assert (out / "RECIPE.md").read_text() == "how it was trained"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        FileExistsError, match=r"model: holds files a model save does not write \(notes\.txt\)"
    ):
        tiny_model(1).save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left


# ---- configs: bad values stop before training, in one line -------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.sampling.temperature", "-1"], r"^error: ValueError: sampling\.temperature: expected ≥ 0"),
        (["--model.init_args.sampling.steps", "0"], r"^error: ValueError: sampling\.steps: expected ≥ 1, got 0"),
        (["--model.init_args.rewards.compositional.reward.class_path", "my_rewards.Nope"],
         r"^error: model\.init_args\.rewards\.compositional\.reward: cannot import 'my_rewards\.Nope' .*registered rewards: .*compositional \(avr\.rewards\.compositional\.CompositionalReward\)"),
        (["--model.init_args.model.path", "checkpoints/no-such-model"],
         r"not a folder .*\(a relative path is read from the working directory"),
        (["--data.init_args.batch_size", "0"], r"^error: ValueError: data\.batch_size: expected ≥ 1 prompts, got 0"),
        (["--model.init_args.lr", "-1"], r"^error: ValueError: model\.lr: expected > 0, got -1"),
        (["--model.init_args.group_size", "null"], r"^error: ValueError: group_size must be an integer of at least 2 .*got None"),
    ],
)  # fmt: skip
def test_a_bad_rl_setting_stops_before_training_naming_it(override, message):
    from avr.fit import main as fit

    with pytest.raises(SystemExit, match=message):
        fit(["experiments/rl.yaml", *override])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("missing", "no such file"),
        ("folder", "a folder; expected a YAML config file"),
        ("list", "expected a mapping of sections (trainer, model, data), got a list"),
        ("tab", "not valid YAML (found character that cannot start any token at line 2, column 1)"),
        ("brace", "not valid YAML (did not find expected ',' or '}' at line 2, column 1)"),
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, capsys, config, message):
    from avr.fit import main as fit

    path = tmp_path / f"{config}.yaml"
    if config == "folder":
        path.mkdir()
    elif config != "missing":
        text = {
            "list": "- a\n- b\n",
            "tab": "trainer:\n\tmax_steps: 3\n",
            "brace": "trainer: {max_steps: 3\n",
        }
        path.write_text(text[config])
    with pytest.raises(SystemExit) as stop:
        fit([str(path)])
    assert stop.value.code == 2 and f"error: {path}: {message}" in capsys.readouterr().err


def test_a_root_dir_that_cannot_be_a_folder_stops_fit_in_one_line(tmp_path, capsys):
    from avr.fit import main as fit

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for root, message in (
        (a_file, "a file; the run writes"),
        (a_file / "sub", "is a file, so no folder"),
    ):
        with pytest.raises(SystemExit) as stop:
            fit(
                [
                    "experiments/rl.yaml",
                    "--model.init_args.model",
                    "null",
                    f"--trainer.default_root_dir={root}",
                ]
            )
        assert stop.value.code == 2
        assert (
            f"error: trainer.default_root_dir {root}: " in (err := capsys.readouterr().err)
            and message in err
        )
    assert a_file.read_text() == "mine"


def test_a_trajectory_longer_than_max_len_stops_fit_in_one_line(dataset, tmp_path, capsys):
    from avr.fit import main as fit

    with pytest.raises(SystemExit) as stop:
        fit(["experiments/sft.yaml", "--model.init_args.max_len", "40", f"--data.init_args.path={dataset}",
             "--trainer.max_steps", "1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger", "false",
             "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])  # fmt: skip
    assert stop.value.code == 2
    assert re.search(
        r"error: trajectory \d+ takes \d+ tokens, over the maximum length 40 \(model\.init_args\.max_len\)",
        capsys.readouterr().err,
    )


def test_rl_csv_logs_are_flushed_every_step_so_a_kill_loses_none():
    from omegaconf import OmegaConf

    for config in ("experiments/rl.yaml", "experiments/bagel/rl.yaml"):
        loggers = OmegaConf.load(config).trainer.logger
        (csv,) = [lg for lg in loggers if lg.class_path.endswith("CSVLogger")]
        assert csv.init_args.flush_logs_every_n_steps == 1, config


@pytest.mark.slow
def test_a_data_build_stopped_by_sigterm_leaves_nothing_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "data"
    command = [sys.executable, "-m", "avr.data", "build", "--n", "200000", "--mode", "direct",
               "--shard-size", "50", "-o", str(out)]  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not any((p / "images").is_dir() for p in tmp_path.glob(".data.*.tmp")):
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # no staging folder, no output


def test_an_evaluation_that_fails_leaves_nothing_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    import avr.evaluate
    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "2", "--seed", "1", "-o", str(prompts)]) == 0
    out = tmp_path / "eval"
    args = ["--model", "shapeworld-tiny-sft", "--prompts", str(prompts), "--modes", "direct",
            "--steps", "1", "-o", str(out)]  # fmt: skip
    assert avr.evaluate.main(args) == 0
    first = (out / "direct" / "results.jsonl").read_text()
    assert [json.loads(r)["filename"] for r in first.splitlines()] == [
        str(out / "direct" / f"0000{i}" / "samples" / "0000.png") for i in range(2)
    ]  # paths of the published folder, not of the staging one
    assert all(Path(json.loads(r)["filename"]).is_file() for r in first.splitlines())

    def broken(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(avr.evaluate, "plot_accuracy", broken)  # after every rollout and score
    with pytest.raises(RuntimeError, match="plotting failed"):
        avr.evaluate.main([*args, "--overwrite"])
    assert (out / "direct" / "results.jsonl").read_text() == first  # the earlier one is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "p.jsonl"]  # no staging left
    with pytest.raises(RuntimeError, match="plotting failed"):
        avr.evaluate.main([*args[:-1], str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_an_evaluation_stopped_by_sigterm_leaves_nothing_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from avr.world.__main__ import main as world

    prompts = tmp_path / "p.jsonl"
    assert world(["prompts", "--n", "2000", "--seed", "1", "-o", str(prompts)]) == 0
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "avr.evaluate", "--model", "shapeworld-tiny-sft", "--prompts",
               str(prompts), "--modes", "direct", "--steps", "1", "-o", str(out)]  # fmt: skip
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".eval.*.tmp")):
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no staging folder, no output
