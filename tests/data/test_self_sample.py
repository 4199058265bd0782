"""Trajectories from the model's own samples: the model draws every image in its own context, the
verifier judges it, and the teacher corrects it by editing what was drawn."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avr.data.__main__ import main as data_main
from avr.data.build import FromModel, SelfSampleStats, build, parse_mix
from avr.data.critique import critique_text, description, is_verdict_ok, read_canvas
from avr.data.teacher import partial_spec
from avr.defaults import tiny_model
from avr.sequence import Trajectory, record_to_trajectory
from avr.world import Verifier, render, sample_scene, sample_spec
from avr.world.edit import correct_scene, detected_scene
from avr.world.scene import Scene, SceneObject
from avr.world.spec import parse_spec


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "data"
    manifest = build(
        out,
        12,
        parse_mix("simple=1,medium=1,complex=1"),
        seed=3,
        mode="adaptive=0.5,reflect=0.5",
        # keep everything: the untrained model draws no right image to balance with
        own=FromModel(tiny_model(0).eval(), "tiny", balance=None, batch=6),
    )
    lines = (out / "shard-00000.jsonl").read_text().splitlines()
    trajectories = [
        record_to_trajectory(json.loads(x), out, f"line {k}") for k, x in enumerate(lines)
    ]
    return manifest, trajectories


def test_every_image_is_the_models_or_a_verified_correction(built):
    manifest, trajectories = built
    verifier = Verifier()
    drawn = 0
    for trajectory in trajectories:
        for segment, target in _judged(trajectory):
            if not segment.is_image:
                continue
            right = verifier.verify(segment.image, target).correct
            if segment.meta["drawn_by"] == "model":
                drawn += 1
                assert segment.loss == right  # a rejected image is read, never learned
            else:  # a teacher's correction or a direct answer's render: always right, learned
                assert right and segment.loss
    replaced = sum(  # a wrong direct answer gives way to the teacher's render
        t.meta["mode"] == "direct" and t.images[0].meta["drawn_by"] == "teacher"
        for t in trajectories
    )
    assert drawn + replaced == manifest["from_model"]["images_drawn"] and drawn > 0
    reflects = [t for t in trajectories if t.meta["mode"] == "reflect"]
    for t in reflects:  # the first refine is the model's own, a second one the teacher's edit
        refined = [s for s in t.images if s.role == "refined"]
        assert [s.meta["drawn_by"] for s in refined] == ["model", "teacher"][: len(refined)]
        assert t.meta["refine_targets"][:1] == ["model"][: len(refined)]
    assert reflects
    assert manifest["from_model"]["model"] == "tiny" and manifest["n"] == 12


def test_critiques_are_the_verifiers_judgement_of_the_image_before_them(built):
    _, trajectories = built
    verifier = Verifier()
    judged = 0
    for trajectory in trajectories:
        image = None
        for segment, target in _judged(trajectory):
            if segment.is_image:
                image = segment.image
            elif image is not None and not segment.text.startswith("<ins>"):
                assert is_verdict_ok(segment.text) == verifier.verify(image, target).correct
                judged += 1
        assert trajectory.segments[1].text.startswith("<mode:")  # chosen, or given and read
    assert judged > 0


def test_refine_targets_edit_the_draft():
    """A wrong image's correction keeps what was right where it was and changes the rest."""
    spec = sample_spec("position", np.random.default_rng(2))
    scene = sample_scene(spec, np.random.default_rng(2))
    first, second = scene.objects
    wrong = Scene((first, SceneObject(second.shape, second.color, first.x, 1 - first.y, 0.18)))
    detections = Verifier().verify(render(wrong), spec).detections
    edited = correct_scene(detected_scene(detections, 64), spec, np.random.default_rng(0))
    assert edited is not None and Verifier().verify(render(edited), spec).correct
    kept = detected_scene(detections, 64).objects
    assert any(o == kept[0] or o == kept[1] for o in edited.objects)  # one of them stays put


def test_a_wrong_colour_is_recoloured_in_place_and_a_missing_object_added():
    spec = sample_spec("color_attr", np.random.default_rng(5))
    clause = spec.include[0]
    other = next(c for c in ("red", "blue", "green") if c != clause.color)
    wrong = Scene((SceneObject(clause.cls, other, 0.3, 0.3, 0.2),))
    detections = Verifier().verify(render(wrong), spec).detections
    edited = correct_scene(detected_scene(detections, 64), spec, np.random.default_rng(0))
    assert Verifier().verify(render(edited), spec).correct
    same = [o for o in edited.objects if abs(o.x - 0.3) < 0.03 and abs(o.y - 0.3) < 0.03]
    assert same and same[0].color == clause.color and len(edited) == len(spec.include)


def test_first_critiques_are_balanced_per_level():
    def trajectory(level, right):
        return Trajectory([], {"level": level, "critiques": [right], "model_images": 1,
                               "model_images_right": int(right), "refine_targets": []})  # fmt: skip

    built = [(k, trajectory("medium", k < 2)) for k in range(10)]  # 2 right, 8 wrong
    built += [(10 + k, trajectory("simple", k < 5)) for k in range(6)]  # 5 right, 1 wrong
    stats = SelfSampleStats()
    kept = stats.balance(built, 2.0)
    assert [k for k, _ in kept] == [0, 1, 2, 3, 4, 5, 10, 11, 15]
    summary = stats.summary()
    assert summary["first_critiques"]["kept"] == {
        "medium/right": 2, "medium/wrong": 4, "simple/right": 2, "simple/wrong": 1}  # fmt: skip
    assert summary["accuracy_by_level"] == {"medium": 0.2, "simple": 5 / 6}
    assert SelfSampleStats().balance(built, None) == built
    only_wrong = [(k, trajectory("complex", False)) for k in range(3)]
    assert SelfSampleStats().balance(only_wrong, 2.0) == []  # fed only wrong, a critic says "wrong"


def _judged(trajectory):
    """Each segment after the prompt with what an image there must satisfy: the prompt's spec, or
    the plan step's partial spec once a plan step was written."""
    spec, step = parse_spec(trajectory.meta["spec"]), -1
    for segment in trajectory.segments[1:]:
        step += not segment.is_image and segment.text.startswith("<ins>")
        yield segment, partial_spec(spec, step) if step >= 0 else spec


def test_a_blank_image_is_corrected_by_adding_everything():
    spec = sample_spec("two_object", np.random.default_rng(1))
    blank = Image.new("RGB", (64, 64), "white")
    edited = correct_scene(
        detected_scene(Verifier().detect(blank), 64), spec, np.random.default_rng(0)
    )
    assert len(edited) == sum(c.count for c in spec.include)


def test_a_clause_whose_colour_no_object_has_is_critiqued_as_missing():
    """ "a blue triangle and a yellow triangle" over an image with only the blue one: nothing can
    be recoloured (the blue triangle is the other clause's), so the critique asks to add one."""
    spec = parse_spec(
        {
            "tag": "two_object",
            "prompt": "a blue triangle and a yellow triangle",
            "include": [
                {"class": "triangle", "count": 1, "color": "blue"},
                {"class": "triangle", "count": 1, "color": "yellow"},
            ],
        }
    )
    image = render(Scene((SceneObject("triangle", "blue", 0.3, 0.5, 0.2),)))
    text = critique_text(Verifier().verify(image, spec), spec)
    assert text == "there is no yellow triangle. <refine>add a yellow triangle</refine>"


def test_merged_builds_keep_every_record_and_image_apart(tmp_path):
    from avr.data.__main__ import main
    from avr.data.datamodule import TrajectoryStream

    for seed in (1, 2):  # both builds number their keys from 0
        build(tmp_path / f"b{seed}", 5, parse_mix("simple=1"), seed=seed, mode="direct")
    assert (
        main(["merge", str(tmp_path / "b1"), str(tmp_path / "b2"), "-o", str(tmp_path / "m")]) == 0
    )
    merged = TrajectoryStream(tmp_path / "m", batch_size=2, shuffle=False)
    assert len(merged.index) == 10
    batches = iter(merged)
    first = next(batches)
    assert len(first) == 2 and all(t.final_image.size == (64, 64) for t in first)
    images = sorted(p.name for p in (tmp_path / "m" / "images").iterdir())
    assert len(images) == 10 and images[0].startswith("s0-") and images[-1].startswith("s1-")
    assert (
        main(["merge", str(tmp_path / "b1"), str(tmp_path / "b2"), "-o", str(tmp_path / "m")]) == 2
    )


def test_critique_views_train_one_critique_of_the_models_image_each(tmp_path):
    manifest = build(
        tmp_path / "views",
        8,
        parse_mix("simple=1,complex=1"),
        seed=4,
        mode="reflect=0.5,adaptive=0.5",
        own=FromModel(tiny_model(0).eval(), balance=None, batch=8, own_refines=2, views=True),
    )
    lines = (tmp_path / "views" / "shard-00000.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    trajectories = {
        r["key"]: record_to_trajectory(r, tmp_path / "views", f"line {k}")
        for k, r in enumerate(records)
    }
    views = {k: t for k, t in trajectories.items() if "view" in t.meta}
    whole = {k: t for k, t in trajectories.items() if "view" not in t.meta}
    assert len(whole) == 8 and views
    verifier, positions = Verifier(), set()
    for key, view in views.items():
        *read, critique = list(_judged(view))
        assert [s.loss for s, _ in read] == [False] * len(read)  # all read but the critique
        image = next(s for s, _ in reversed(read) if s.is_image)
        assert image.meta["drawn_by"] == "model" and critique[0].loss
        assert is_verdict_ok(critique[0].text) == view.meta["view"]["ok"]
        assert view.meta["view"]["ok"] == verifier.verify(image.image, critique[1]).correct
        source = whole[key.split("v")[0]].segments
        assert [s.text for s in view.segments] == [s.text for s in source[: len(view.segments)]]
        positions.add(view.meta["view"]["position"])
    assert positions == {"first", "later"}  # drafts and the model's own refines
    for t in whole.values():  # critiques are learned from views only
        assert not any(s.loss for s in t.segments if "critique" in s.meta)
        assert sum("critique" in s.meta for s in t.segments) == len(t.meta["critiques"])
    drawn = manifest["from_model"]["critique_views"]["drawn"]
    assert sum(drawn.values()) == len(views) == manifest["counts"]["mode"]["critique view"]


def test_critique_views_are_balanced_per_level_position_and_verdict():
    def view(level, position, ok):
        return Trajectory([], {"level": level, "view": {"position": position, "ok": ok}})

    views = [(f"a{k}", view("simple", "first", k < 2)) for k in range(6)]  # 2 right, 4 wrong
    views += [(f"b{k}", view("simple", "later", False)) for k in range(3)]  # no right one
    views += [(f"c{k}", view("medium", "later", k > 0)) for k in range(3)]  # 1 wrong, 2 right
    stats = SelfSampleStats()
    kept = stats.balance_views(views, 1.0)
    assert [k for k, _ in kept] == ["a0", "a1", "a2", "a3", "c0", "c1"]
    assert stats.views["kept"] == {
        "simple/first/right": 2, "simple/first/wrong": 2, "medium/later/wrong": 1,
        "medium/later/right": 1}  # fmt: skip
    assert SelfSampleStats().balance_views(views, None) == views


def test_flags_on_the_models_images_need_a_model(tmp_path, capsys):
    for flags in (["--critique-views"], ["--tries", "3"], ["--drop-unsolved"]):
        out = tmp_path / "x"
        assert data_main(["build", "--n", "2", "--mode", "direct", *flags, "-o", str(out)]) == 2
        assert f"error: {flags[0]} needs --from-model" in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(ValueError, match="--tries: expected ≥ 1"):
        FromModel(None, tries=0)


def test_tries_keep_the_models_first_right_answer_or_drop_the_prompt(tmp_path):
    """Rejection sampling on the model's own successes: a direct prompt is answered again until
    the verifier accepts an answer; with `drop_unsolved` a prompt never answered right is left out,
    and the manifest counts every answer drawn, kept or not."""
    from avr.backbone import from_pretrained

    model = from_pretrained(Path(__file__).parents[2] / "checkpoints/shapeworld-tiny-self").eval()
    common = dict(mix=parse_mix("simple=1,medium=1"), seed=6, mode="direct")
    once = build(tmp_path / "once", 8, own=FromModel(model, batch=8), **common)
    tried = FromModel(model, batch=8, tries=4, drop_unsolved=True)
    manifest = build(tmp_path / "tries", 8, own=tried, **common)
    lines = (tmp_path / "tries" / "shard-00000.jsonl").read_text().splitlines()
    kept = [record_to_trajectory(json.loads(x), tmp_path / "tries", "") for x in lines]
    verifier, right_first = Verifier(), 0
    for t in kept:
        (answer,) = t.images
        assert answer.meta["drawn_by"] == "model" and answer.loss
        assert verifier.verify(answer.image, parse_spec(t.meta["spec"])).correct
        assert t.meta["solved"] and 1 <= t.meta["tries"] <= 4
        right_first += t.meta["tries"] == 1
    own, first = manifest["from_model"], once["from_model"]
    assert own["images_right"] == len(kept) == manifest["n"] > first["images_right"] == right_first
    assert first["images_drawn"] == 8 and len(kept) < 8  # one prompt at least stays unsolved
    assert own["images_drawn"] == sum(t.meta["tries"] for t in kept) + 4 * (8 - len(kept))


def test_read_canvas_lists_what_the_verifier_sees_in_reading_order():
    scene = Scene(
        (
            SceneObject("square", "blue", 0.8, 0.8, 0.2),
            SceneObject("circle", "red", 0.2, 0.2, 0.2),
            SceneObject("circle", "red", 0.8, 0.2, 0.2),
        )
    )
    seen = read_canvas(Verifier().detect(render(scene, 64)), 64)
    assert seen == "a red circle, a red circle, a blue square"
    assert read_canvas([], 64) == "nothing"


def test_described_critiques_open_with_the_verifiers_reading_of_the_models_image(tmp_path):
    manifest = build(
        tmp_path / "des",
        6,
        parse_mix("simple=1,medium=1"),
        seed=5,
        mode="reflect",
        describe_critiques=True,
        own=FromModel(tiny_model(0).eval(), balance=None, batch=6, own_refines=1),
    )
    assert manifest["describe_critiques"] is True
    lines = (tmp_path / "des" / "shard-00000.jsonl").read_text().splitlines()
    verifier, checked = Verifier(), 0
    for k, line in enumerate(lines):
        trajectory = record_to_trajectory(json.loads(line), tmp_path / "des", f"line {k}")
        image = None
        for segment in trajectory.segments[2:]:
            if segment.is_image:
                image = segment.image
                continue
            seen = read_canvas(verifier.detect(image), image.width)
            assert description(segment.text) == seen
            assert segment.text.startswith(f"<des>{seen}</des>")
            checked += 1
    assert checked >= 6
