import math

import numpy as np

from avr.world import Clause, PromptSpec, Scene, SceneObject, render, sample_scene, sample_specs
from avr.world.fidelity import OUTCOMES, BuildsOn, Fidelity, Outcomes, asked_objects, outcome


def test_ground_truth_renders_are_exact_and_precise(verifier):
    specs = sample_specs(48, seed=3)
    fidelity = Fidelity().extend(
        (verifier.verify(render(sample_scene(s, np.random.default_rng(i))), s), s)
        for i, s in enumerate(specs)
    )
    summary = fidelity.summary()
    assert summary["colour_precision"] > 0.95 and summary["shape_precision"] > 0.95
    assert summary["exact"] > 0.95 and summary["extra_per_image"] < 0.05
    assert abs(summary["objects_per_image"] - summary["asked_per_image"]) < 0.1


def test_extra_objects_pass_geneval_but_not_exact(verifier):
    spec = PromptSpec("single_object", "a red circle", (Clause("circle", 1, "red"),))
    right = SceneObject("circle", "red", 0.3, 0.3, 0.2)
    extras = Scene((right, SceneObject("square", "blue", 0.7, 0.7, 0.2)))
    fidelity = Fidelity()
    verdict = verifier.verify(render(extras), spec)
    assert verdict.correct  # GenEval's at-least semantics credit it
    fidelity.update(verdict, spec)
    summary = fidelity.summary()
    assert summary["exact"] == 0.0 and summary["accuracy"] == 1.0
    assert summary["extra_per_image"] == 1.0 and summary["objects_per_image"] == 2.0
    assert summary["colour_precision"] == 0.5 and summary["shape_precision"] == 0.5


def test_colour_precision_skips_prompts_that_name_no_colour(verifier):
    spec = PromptSpec("single_object", "a square", (Clause("square", 1),))
    assert asked_objects(spec) == 1
    image = render(Scene((SceneObject("square", "green", 0.5, 0.5, 0.2),)))
    summary = Fidelity().extend([(verifier.verify(image, spec), spec)]).summary()
    assert math.isnan(summary["colour_precision"]) and summary["shape_precision"] == 1.0
    assert summary["exact"] == 1.0
    assert math.isnan(Fidelity().summary()["exact"])


TWO = PromptSpec(
    "two_object",
    "a red circle and a blue square",
    (Clause("circle", 1, "red"), Clause("square", 1, "blue")),
)
CIRCLE = SceneObject("circle", "red", 0.3, 0.3, 0.2)  # TWO's objects, as asked
SQUARE = SceneObject("square", "blue", 0.7, 0.7, 0.2)


def test_builds_on_counts_steps_that_keep_what_was_right(verifier):
    spec, circle, square = TWO, CIRCLE, SQUARE
    wrong = SceneObject("triangle", "green", 0.7, 0.3, 0.2)

    def judged(*objects):
        return verifier.verify(render(Scene(objects)), spec)

    builds = BuildsOn()
    builds.update([judged(circle), judged(circle, square), judged(square)])  # keeps, then drops
    builds.update([judged(wrong), judged(circle)])  # nothing to keep: counted apart
    summary = builds.summary()
    assert (summary["steps"], summary["rate"], summary["empty"]) == (2, 0.5, 1)
    assert math.isnan(BuildsOn().summary()["rate"])


def test_outcome_names_what_decided_each_image(verifier):
    spec, circle, square = TWO, CIRCLE, SQUARE
    cases = {
        "exact": (circle, square),
        "extra_objects": (circle, square, SceneObject("triangle", "green", 0.3, 0.7, 0.2)),
        "blank": (),
        "too_few_objects": (circle,),
        "wrong_shape": (circle, SceneObject("triangle", "blue", 0.7, 0.7, 0.2)),
        "wrong_colour": (circle, SceneObject("square", "green", 0.7, 0.7, 0.2)),
    }
    outcomes = Outcomes()
    for expected, objects in cases.items():
        verdict = verifier.verify(render(Scene(objects)), spec)
        assert outcome(verdict, spec) == expected
        outcomes.update(verdict, spec, "medium" if expected == "blank" else "simple")
    exclude = PromptSpec(
        "counting",
        "exactly two circles",
        (Clause("circle", 2),),
        (Clause("circle", 3),),
    )
    three = Scene(tuple(SceneObject("circle", "red", x, 0.5, 0.15) for x in (0.2, 0.5, 0.8)))
    assert outcome(verifier.verify(render(three), exclude), exclude) == "wrong_count"
    summary = outcomes.summary()
    assert summary["simple"]["images"] == 5 and summary["medium"]["images"] == 1
    assert summary["medium"]["blank"] == 1.0 and summary["simple"]["blank"] == 0.0
    assert sum(v for k, v in summary["simple"].items() if k in OUTCOMES) == 1.0
    assert set(summary["simple"]) == {*OUTCOMES, "images"}
