import numpy as np
import pytest
from PIL import Image, ImageFilter

from avr.world import (
    TAGS,
    Clause,
    ProblemKind,
    PromptSpec,
    Scene,
    SceneObject,
    VocabularyError,
    degrade,
    render,
    sample_scene,
    sample_specs,
)
from avr.world.verify import box_relations

BLANK = Image.new("RGB", (64, 64), (255, 255, 255))


@pytest.mark.slow
@pytest.mark.parametrize(("noisy", "floor"), [(False, 0.995), (True, 0.97)])
def test_verifier_agrees_with_ground_truth_on_2000_renders(verifier, noisy, floor):
    specs = sample_specs(2000, seed=7)
    assert {s.tag for s in specs} == set(TAGS)
    agree = 0
    for i, spec in enumerate(specs):
        image = render(sample_scene(spec, np.random.default_rng([7, i])))
        if noisy:
            image = degrade(image, noise=0.05, blur=0.5, seed=i)
        agree += verifier.verify(image, spec).correct
    assert agree / len(specs) >= floor


def test_detects_shape_color_and_box(verifier):
    scene = Scene(
        (
            SceneObject("circle", "orange", 0.25, 0.25, 0.2),
            SceneObject("square", "yellow", 0.75, 0.25, 0.15),
            SceneObject("triangle", "purple", 0.5, 0.72, 0.22),
        )
    )
    found = {(d.shape, d.color): d for d in verifier.detect(render(scene))}
    assert set(found) == {("circle", "orange"), ("square", "yellow"), ("triangle", "purple")}
    cx, cy = found[("square", "yellow")].center
    assert abs(cx - 48) < 0.5 and abs(cy - 16) < 0.5
    assert verifier.detect(BLANK) == []


def test_reads_float_arrays_and_rejects_bad_images(verifier, specs_and_scenes):
    spec, scene = specs_and_scenes[0]
    pixels = np.asarray(render(scene), dtype=np.float32) / 255
    assert verifier.verify(pixels, spec).correct
    with pytest.raises(
        ValueError, match=r"expected an RGB array of shape \(H, W, 3\), got \(64, 64\)"
    ):
        verifier.detect(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        verifier.detect(Image.new("L", (64, 64)))


def _spec(tag, include, exclude=()):
    return PromptSpec(tag, tag, tuple(include), tuple(exclude))


def test_empty_canvas_fails_every_include(verifier):
    verdict = verifier.verify(BLANK, _spec("two_object", [Clause("circle"), Clause("square")]))
    assert not verdict.correct and verdict.score == 0.0
    assert [p.problem for p in verdict.problems] == [ProblemKind.MISSING, ProblemKind.MISSING]
    assert verdict.reason == "expected circle>=1, found 0\nexpected square>=1, found 0"


def test_wrong_color_fails(verifier):
    spec = _spec("color_attr", [Clause("circle", 1, "red"), Clause("square", 1, "blue")])
    scene = Scene(
        (SceneObject("circle", "red", 0.3, 0.5, 0.2), SceneObject("square", "blue", 0.7, 0.5, 0.2))
    )
    assert verifier.verify(render(scene), spec).correct
    verdict = verifier.verify(render(scene.recolor(1, "green")), spec)
    assert not verdict.correct and verdict.score == 0.5
    (problem,) = verdict.problems
    assert problem.problem is ProblemKind.WRONG_COLOR and problem.clause == Clause(
        "square", 1, "blue"
    )
    assert "1 green" in problem.message


def test_one_object_too_many_or_too_few_fails_counting(verifier):
    spec = _spec("counting", [Clause("triangle", 3)], [Clause("triangle", 4)])
    scene = Scene(
        tuple(
            SceneObject("triangle", c, x, 0.3, 0.18)
            for c, x in [("red", 0.2), ("blue", 0.5), ("green", 0.8)]
        )
    )
    assert verifier.verify(render(scene), spec).correct
    too_many = verifier.verify(
        render(scene.add(SceneObject("triangle", "orange", 0.5, 0.75, 0.18))), spec
    )
    assert not too_many.correct
    assert [(p.kind, p.problem, p.found) for p in too_many.problems] == [
        ("exclude", ProblemKind.WRONG_COUNT, 4)
    ]
    too_few = verifier.verify(render(scene.remove(0)), spec)
    assert [(p.kind, p.problem, p.found) for p in too_few.problems] == [
        ("include", ProblemKind.WRONG_COUNT, 2)
    ]


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_swapped_relation_fails(verifier, relation):
    spec = _spec("position", [Clause("circle"), Clause("square", 1, position=(relation, 0))])
    scene = sample_scene(spec, np.random.default_rng(1))
    assert verifier.verify(render(scene), spec).correct
    a, b = scene.objects
    swapped = scene.move(0, b.x, b.y).move(1, a.x, a.y)
    verdict = verifier.verify(render(swapped), spec)
    assert not verdict.correct
    (problem,) = verdict.problems
    assert (
        problem.problem is ProblemKind.WRONG_RELATION
        and f"square {relation} target" in problem.message
    )


def test_relation_without_its_target_is_reported(verifier):
    spec = _spec("position", [Clause("circle"), Clause("square", 1, position=("above", 0))])
    image = render(Scene((SceneObject("square", "red", 0.5, 0.3, 0.2),)))
    verdict = verifier.verify(image, spec)
    assert [p.problem for p in verdict.problems] == [
        ProblemKind.MISSING,
        ProblemKind.WRONG_RELATION,
    ]
    assert "no target for square to be above" in verdict.reason


def test_box_relations_follow_geneval_rule():
    left, right = (0, 0, 10, 10), (20, 2, 30, 12)
    assert box_relations(left, right) == {"left of"}
    assert box_relations(right, left) == {"right of"}
    assert box_relations((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert box_relations((0, 0, 10, 10), (12, 12, 22, 22)) == {"left of", "above"}  # diagonal: both
    assert box_relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # within the 10% margin


def test_out_of_vocabulary_spec_is_refused(verifier):
    with pytest.raises(VocabularyError, match="class 'bench' is not in ShapeWorld's vocabulary"):
        verifier.verify(BLANK, _spec("single_object", [Clause("bench")]))
    with pytest.raises(VocabularyError, match="color 'pink' is not in ShapeWorld's vocabulary"):
        verifier.verify(BLANK, _spec("colors", [Clause("circle", 1, "pink")]))


def test_touching_objects_of_two_colors_are_split(verifier):
    scene = Scene(
        (SceneObject("square", "red", 0.4, 0.5, 0.2), SceneObject("square", "blue", 0.6, 0.5, 0.2))
    )
    found = sorted((d.shape, d.color) for d in verifier.detect(render(scene)))
    assert [c for _, c in found] == ["blue", "red"]


def test_speckled_noise_is_not_read_as_objects(verifier):
    """What an untrained generator draws: colored speckle. No shape explains it, so nothing counts."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        pixels = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
        pixels[rng.random((64, 64)) < 0.5] = 255
        image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8))
        assert verifier.detect(image) == []
        spec = _spec("single_object", [Clause("circle")])
        assert not verifier.verify(image, spec).correct
