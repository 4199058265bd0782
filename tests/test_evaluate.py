import json

from avr.backbone import save_pretrained
from avr.defaults import tiny_model
from avr.evaluate import main
from avr.world import TAGS, sample_specs, save_specs


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
    assert set(metrics["modes"]) == {"direct", "adaptive"}
    direct = metrics["modes"]["direct"]
    assert set(direct["by_tag"]) == set(TAGS) and direct["per_prompt"]["nfe"] == 2.0
    assert (out / "direct" / "00007" / "samples" / "0000.png").is_file()
    assert len((out / "adaptive" / "results.jsonl").read_text().splitlines()) == 8
    assert "overall (mean over tags)" in (out / "report.md").read_text()
    assert "report:" in capsys.readouterr().out


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
