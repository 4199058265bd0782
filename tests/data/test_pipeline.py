import itertools
import json

import pytest
import torch

from avr.backbone.packing import Packer
from avr.data.__main__ import main
from avr.data.build import build, parse_mix
from avr.data.datamodule import TrajectoryDataModule, TrajectoryStream
from avr.defaults import tiny_model
from avr.registry import MODES
from avr.sequence import TrajectoryError
from avr.world import complexity, parse_spec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d"
    build(out, 40, parse_mix("simple=0.3,medium=0.4,complex=0.3"), seed=3, shard_size=16)
    return out


def test_build_writes_shards_and_a_manifest_and_regenerates_from_the_seed(
    dataset, tmp_path, capsys
):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [s["records"] for s in manifest["shards"]] == [16, 16, 8]
    assert sum(manifest["counts"]["level"].values()) == 40
    assert set(manifest["counts"]["mode"]) == {"direct", "reflect", "plan"}
    for line in (dataset / "shard-00000.jsonl").read_text().splitlines():
        meta = json.loads(line)["meta"]
        expected = {"simple": "direct", "medium": "reflect", "complex": "plan"}[meta["level"]]
        assert meta["mode"] == expected
    assert (
        main(
            [
                "build",
                "--n",
                "40",
                "--seed",
                "3",
                "--shard-size",
                "16",
                "-o",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert "trajectories" in capsys.readouterr().out
    for name in ("shard-00001.jsonl", "manifest.json", "images/0000017_2.png"):
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes()


def test_mix_and_mode_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--mix: unknown level 'hard'"):
        parse_mix("simple=1,hard=2")
    assert main(["build", "--n", "2", "--mode", "sketchy", "-o", str(tmp_path / "x")]) == 2
    known = ", ".join(MODES.names())  # the registry's, so a user's installed plugin is listed too
    assert f"unknown mode 'sketchy'; registered modes: {known}" in capsys.readouterr().err


def test_every_tag_belongs_to_exactly_one_level():
    from avr.data.build import LEVEL_TAGS
    from avr.world import TAGS

    listed = [t for tags in LEVEL_TAGS.values() for t in tags]
    assert sorted(listed) == sorted(TAGS)


def test_complexity_mix_is_honoured():
    assert parse_mix("simple=1,complex=3") == {"simple": 0.25, "complex": 0.75}


def _batches(stream_or_module, n):
    loader = (
        stream_or_module.train_dataloader()
        if hasattr(stream_or_module, "train_dataloader")
        else stream_or_module
    )
    return list(itertools.islice(iter(loader), n))


def test_workers_and_resume_give_the_same_batches(dataset):
    model = tiny_model(0)
    packer = Packer(model.tokenizer, model.geometry, 4096)
    single = TrajectoryDataModule(str(dataset), batch_size=6, seed=1, num_workers=0)
    single.packer = packer
    reference = _batches(single, 9)  # 40 // 6 = 6 batches an epoch: this crosses into epoch 2
    multi = TrajectoryDataModule(str(dataset), batch_size=6, seed=1, num_workers=2)
    multi.packer = packer
    for a, b in zip(reference, _batches(multi, 9), strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.gen_noise, b.gen_noise)
    resumed = TrajectoryDataModule(str(dataset), batch_size=6, seed=1)
    resumed.packer = packer
    resumed.load_state_dict({"batches_seen": 4, "seed": 1})
    for a, b in zip(reference[4:], _batches(resumed, 5), strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.gen_t, b.gen_t)
    with pytest.raises(ValueError, match="data seed 2 differs from this run's 1"):
        resumed.load_state_dict({"batches_seen": 4, "seed": 2})


def test_epochs_reshuffle_and_visit_every_record(dataset):
    stream = TrajectoryStream(dataset, batch_size=8, seed=0)
    first = [r for b in range(stream.per_epoch) for r in stream.batch_records(b)[1]]
    second = [
        r for b in range(stream.per_epoch, 2 * stream.per_epoch) for r in stream.batch_records(b)[1]
    ]
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    batch = _batches(stream, 1)[0]
    assert [t.meta["level"] for t in batch] == [
        complexity(parse_spec(t.meta["spec"])).level for t in batch
    ]


def test_bad_records_fail_or_are_skipped_and_counted(dataset, tmp_path, caplog):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    first = json.loads((broken / "shard-00000.jsonl").read_text().splitlines()[0])
    image = next(s["image"] for s in first["segments"] if s["type"] == "image")
    (broken / image).write_bytes(b"\x89PNG broken")
    stream = TrajectoryStream(broken, batch_size=40, shuffle=False)
    with pytest.raises(
        TrajectoryError, match=r"shard-00000\.jsonl:1: segments\[\d\]: .*: not a readable image"
    ):
        _batches(stream, 1)
    lenient = TrajectoryStream(broken, batch_size=40, shuffle=False, skip_invalid=True)
    with caplog.at_level("WARNING", logger="avr.data"):
        (batch,) = _batches(lenient, 1)
    assert len(batch) == 39
    assert (
        "skipped invalid record (1 so far in worker 0)" in caplog.text
        and "shard-00000.jsonl:1" in caplog.text
    )
