"""Critique agreement, plan-step accuracy and refine outcomes, measured on trajectories whose
answers are known: the teacher's (it critiques with the verifier) and edited copies of them."""

import numpy as np
import pytest

from avr.data.critique import OK_IMAGE
from avr.data.teacher import ShapeWorldTeacher
from avr.registry import MODES
from avr.understanding import Understanding
from avr.world import sample_scene, sample_specs

SPECS = sample_specs(12, ["counting", "position", "multi_relation"], seed=4)


def _built(mode, spec, seed=0, **kwargs):
    teacher = ShapeWorldTeacher(
        sample_scene(spec, np.random.default_rng(seed)), np.random.default_rng(seed), **kwargs
    )
    return MODES.get(mode)().build(teacher, spec)


def test_the_teachers_critiques_agree_and_its_plans_are_exact():
    understanding = Understanding()
    for spec in SPECS:
        understanding.update(_built("reflect", spec), spec)
        understanding.update(_built("plan", spec, sketch_error_rate=0.5), spec)
    summary = understanding.summary()
    critique = summary["critique"]
    assert critique["agreement"] == 1.0 and critique["false_alarm_rate"] in (0.0, None)
    assert critique["miss_rate"] == 0.0 and critique["wrong_images"] > 0
    assert critique["by_round"]["first"]["wrong_images"] >= len(SPECS)  # every reflect draft
    assert critique["by_round"]["later"]["critiques"] > 0
    plans = summary["plan_steps"]
    assert plans["accuracy"] == 1.0 and plans["written"] == plans["asked"] > 0
    refines = summary["refines"]
    assert refines["fix_rate"] == 1.0 and refines["from_wrong"] >= len(SPECS)


def test_a_critic_that_always_says_right_misses_every_wrong_image():
    understanding = Understanding()
    for spec in SPECS:
        trajectory = _built("reflect", spec)
        for segment in trajectory.segments:
            if not segment.is_image and "<refine>" in (segment.text or ""):
                segment.text = OK_IMAGE
        understanding.update(trajectory, spec)
    critique = understanding.summary()["critique"]
    assert critique["miss_rate"] == 1.0 and critique["by_round"]["first"]["agreement"] == 0.0
    assert critique["balanced_accuracy"] == pytest.approx(0.5)  # right images still accepted
    assert set(critique["by_problem"]) and all(
        t["miss_rate"] == 1.0 for t in critique["by_problem"].values()
    )


def test_a_plan_step_that_differs_from_the_teachers_is_counted_wrong():
    spec = SPECS[-1]
    trajectory = _built("plan", spec, sketch_error_rate=0.0)
    plans = [s for s in trajectory.segments if not s.is_image and s.text.startswith("<ins>")]
    plans[1].text = plans[1].text.replace("add", "draw", 1)
    understanding = Understanding()
    understanding.update(trajectory, spec)
    steps = understanding.summary()["plan_steps"]
    assert steps["written"] == len(spec.include) and steps["exact"] == len(spec.include) - 1


def test_described_critiques_read_the_canvas_and_a_wrong_reading_is_counted():
    understanding = Understanding()
    trajectories = [(_built("reflect", s, describe_critiques=True), s) for s in SPECS]
    for trajectory, spec in trajectories:
        critiques = [s.text for s in trajectory.segments[1:] if not s.is_image][1:]
        assert critiques and all(c.startswith("<des>") for c in critiques)
        understanding.update(trajectory, spec)
    summary = understanding.summary()
    assert summary["critique"]["agreement"] == 1.0  # the verdict still follows the image
    described = summary["descriptions"]
    assert described["written"] == summary["critique"]["critiques"]
    assert described["accuracy"] == described["object_accuracy"] == 1.0
    trajectory, spec = trajectories[0]
    critique = next(s for s in trajectory.segments[2:] if not s.is_image)
    first, _, rest = critique.text.removeprefix("<des>").partition("</des>")
    moved = f"{first} at the top"  # the same objects, read with a place: not the exact text
    for text in (moved, f"{first}, a red circle"):
        understanding = Understanding()
        critique.text = f"<des>{text}</des>{rest}"
        understanding.update(trajectory, spec)
        described = understanding.summary()["descriptions"]
        assert described["exact"] == described["written"] - 1
        assert described["objects"] == described["written"] - (text is not moved)
