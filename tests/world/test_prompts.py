import numpy as np
import pytest

from avr.world import LEVELS, TAGS, Clause, PromptSpec, complexity, sample_scene, sample_specs
from avr.world.spec import MAX_OBJECTS

EXPECTED_LEVEL = {
    "single_object": "simple",
    "two_object": "simple",
    "colors": "simple",
    "counting": "medium",
    "position": "medium",
    "color_attr": "medium",
    "multi_count": "complex",
    "multi_relation": "complex",
}


def test_same_seed_same_prompts_other_seed_other_prompts():
    assert sample_specs(50, seed=3) == sample_specs(50, seed=3)
    assert sample_specs(50, seed=3) != sample_specs(50, seed=4)


@pytest.mark.parametrize("tag", TAGS)
def test_every_tag_has_varied_prompts_and_its_level(tag):
    specs = sample_specs(60, [tag], seed=0)
    assert {s.tag for s in specs} == {tag}
    assert len({s.prompt for s in specs}) >= 20
    frames = {s.prompt.split()[0] for s in specs}
    assert len(frames) >= 3  # not one fixed sentence
    assert {complexity(s).level for s in specs} == {EXPECTED_LEVEL[tag]}


def test_planning_tags_ask_for_what_their_names_say():
    for spec in sample_specs(40, ["multi_count"], seed=1):
        assert len(spec.include) >= 2 and all(c.color for c in spec.include)
        assert max(c.count for c in spec.include) >= 2
        assert [c.count + 1 for c in spec.include] == [c.count for c in spec.exclude]
    for spec in sample_specs(40, ["multi_relation"], seed=1):
        assert 3 <= len(spec.include) <= 5
        assert sum(c.position is not None for c in spec.include) >= 2


def test_scene_holds_exactly_the_included_objects(specs_and_scenes):
    for spec, scene in specs_and_scenes:
        assert len(scene) == sum(c.count for c in spec.include) <= MAX_OBJECTS
        for clause in spec.include:
            n = sum(
                o.shape == clause.cls and clause.color in (None, o.color) for o in scene.objects
            )
            assert n >= clause.count


def test_unknown_tag_and_unplaceable_spec_are_errors():
    with pytest.raises(ValueError, match="unknown tag 'shapes'; expected one of single_object"):
        sample_specs(3, ["shapes"])
    crowded = PromptSpec("counting", "many", (Clause("circle", 9),))
    with pytest.raises(ValueError, match="ShapeWorld draws at most MAX_OBJECTS = 8"):
        sample_scene(crowded, np.random.default_rng(0))


def test_complexity_counts_and_thresholds():
    simple = PromptSpec("colors", "a red circle", (Clause("circle", 1, "red"),))
    assert complexity(simple).score == 2 and complexity(simple).level == "simple"
    count = PromptSpec("counting", "4 squares", (Clause("square", 4),), (Clause("square", 5),))
    assert (complexity(count).entities, complexity(count).attributes) == (4, 2)
    assert complexity(count).level == "medium"
    relation = PromptSpec(
        "x",
        "x",
        (Clause("circle", 1, "red"), Clause("square", 1, "blue", ("above", 0)), Clause("triangle")),
    )
    assert complexity(relation).relations == 1 and complexity(relation).score == 3 + 2 + 2
    assert complexity(relation).level == "complex"
    assert LEVELS == ("simple", "medium", "complex")
