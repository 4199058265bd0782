import json
import shutil

from avr.world.__main__ import main


def test_prompts_render_score_round_trip(tmp_path, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "gt"
    assert main(["prompts", "--n", "16", "--seed", "5", "-o", str(prompts)]) == 0
    assert len(prompts.read_text().splitlines()) == 16
    assert (
        main(["render", str(prompts), "-o", str(out), "--per-prompt", "2", "--resolution", "32"])
        == 0
    )
    assert (out / "00015" / "samples" / "0001.png").is_file()
    assert json.loads((out / "00003" / "metadata.jsonl").read_text())["prompt"]
    capsys.readouterr()
    assert main(["score", str(out)]) == 0
    table = capsys.readouterr().out
    assert (
        "overall (mean over tags)" in table
        and "level: complex" in table
        and "multi_relation" in table
    )
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 32
    assert set(records[0]) >= {"filename", "tag", "prompt", "correct", "reason", "score"}
    assert all(r["correct"] for r in records)


def test_score_counts_what_the_images_show(tmp_path, capsys):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "gt"
    main(["prompts", "--n", "2", "--tags", "colors", "-o", str(prompts)])
    main(["render", str(prompts), "-o", str(out)])
    # Swap the two prompts' images: each image now shows the other prompt's object.
    a, b = out / "00000" / "samples" / "0000.png", out / "00001" / "samples" / "0000.png"
    tmp = tmp_path / "swap.png"
    shutil.move(a, tmp), shutil.move(b, a), shutil.move(tmp, b)
    main(["score", str(out)])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    specs = [json.loads(r["metadata"]) for r in records]
    same = specs[0]["include"] == specs[1]["include"]
    assert [r["correct"] for r in records] == [same, same]


def test_geneval_folder_fails_naming_the_first_foreign_class(tmp_path, capsys, pytestconfig):
    lines = (
        (pytestconfig.rootpath / "tests/fixtures/geneval_metadata_sample.jsonl")
        .read_text()
        .splitlines()
    )
    for i, line in enumerate(lines):
        (tmp_path / f"{i:05d}" / "samples").mkdir(parents=True)
        (tmp_path / f"{i:05d}" / "metadata.jsonl").write_text(line + "\n")
    assert main(["score", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path}/00000/metadata.jsonl:1: class 'bench' is not in ShapeWorld's vocabulary" in err
    )


def test_malformed_prompt_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"tag": "colors", "prompt": "x", "include": [{"class": "circle"}]}\n{"tag": "x"}\n'
    )
    assert main(["render", str(bad), "-o", str(tmp_path / "out")]) == 2
    assert f"{bad}:2: missing required key 'prompt'" in capsys.readouterr().err


def test_prompts_to_stdout_print_the_lines_alone(tmp_path, capsys, monkeypatch):
    from avr.world.spec import parse_line

    monkeypatch.chdir(tmp_path)
    assert main(["prompts", "--n", "3", "--seed", "2", "-o", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(parse_line(line).prompt for line in lines)
    assert list(tmp_path.iterdir()) == []  # no file named "-"
