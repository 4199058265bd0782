import pytest

from avr.curves import main, moving_average, read_curve


def _log(folder, rows, version=0):
    path = folder / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    lines = ["step,train/reward/compositional,train/loss"]
    lines += [f"{s},{r},0.1" for s, r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_curves_read_the_newest_log_and_compare_thirds(tmp_path, capsys):
    up, flat = tmp_path / "up", tmp_path / "flat"
    _log(up, [(0, 9.0)])  # an older version of the run is ignored
    _log(up, [(s, 0.1 * s) for s in range(9)] + [(9, "")], version=1)  # an empty cell is skipped
    _log(flat, [(s, 0.5) for s in range(9)])
    curve = read_curve(up, "train/reward/compositional")
    assert curve.steps.tolist() == list(range(9))
    assert curve.thirds() == pytest.approx((0.1, 0.7))
    out = tmp_path / "curves.png"
    main([str(up), str(flat), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "last third 0.7000 (+0.6000): rises" in printed
    assert "(+0.0000): does not rise" in printed
    assert out.stat().st_size > 1000
    assert moving_average(curve.values, 2).tolist() == pytest.approx(
        [0.0, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75]
    )


def test_curves_name_the_file_and_what_is_missing(tmp_path):
    _log(tmp_path / "run", [(0, 0.5)])
    with pytest.raises(KeyError, match=r"metrics\.csv: no column 'train/reward'.*train/loss"):
        read_curve(tmp_path / "run", "train/reward")
    with pytest.raises(FileNotFoundError, match=r"empty: no csv/version_\*/metrics\.csv"):
        read_curve(tmp_path / "empty", "train/loss")


def test_mode_usage_per_level_first_and_last_third(tmp_path, capsys):
    from avr.curves import mode_usage

    path = tmp_path / "rl" / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    header = "step,train/reward,train/reward/compositional,train/mode/medium/direct,train/mode/medium/reflect"
    rows = [f"{s},0.5,0.3,{0 if s < 3 else 3},{4 if s < 3 else 1}" for s in range(9)]
    path.write_text("\n".join([header, *rows]) + "\n")
    usage = mode_usage(tmp_path / "rl")
    assert usage == {"medium": {"direct": (0.0, 0.75), "reflect": (1.0, 0.25)}}
    main([str(tmp_path / "rl"), "--modes"])
    assert "medium: direct 0% → 75%, reflect 100% → 25%" in capsys.readouterr().out
