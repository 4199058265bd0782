"""Free-text prompts read back into the specs the prompt sampler wrote (`avr.world.parse`)."""

import pytest

from avr.world import Clause, sample_specs
from avr.world.parse import parse_prompt


@pytest.mark.parametrize("split", ["all", "heldout"])
def test_every_sampled_prompt_parses_back_to_its_spec(split):
    specs = sample_specs(3000, seed=7, split=split)
    for spec in specs:
        parsed = parse_prompt(spec.prompt)
        assert parsed is not None, spec.prompt
        assert (parsed.tag, parsed.include, parsed.exclude) == (
            spec.tag,
            spec.include,
            spec.exclude,
        ), spec.prompt
        assert parsed.prompt == spec.prompt


def test_typed_prompts_parse_as_the_sampler_reads_them():
    spec = parse_prompt("A red circle left of a blue square.")
    assert spec.tag == "position" and spec.include == (
        Clause("square", 1, "blue"),
        Clause("circle", 1, "red", ("left of", 0)),
    )
    spec = parse_prompt("draw exactly 3 triangles")
    assert spec.include == (Clause("triangle", 3),) and spec.exclude == (Clause("triangle", 4),)
    spec = parse_prompt("a green square, a red circle beneath the green square and a blue triangle")
    assert spec.tag == "multi_relation" and spec.include[1].position == ("below", 0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a cat on a mat",
        "two circle",  # a count without its plural
        "a circles",
        "a red circle left of the blue square",  # no blue square named before
        "a circle alone",  # "alone" belongs to one coloured object
        "a hexagon",
        "zero circles",
    ],
)
def test_what_the_grammar_cannot_read_is_none(text):
    assert parse_prompt(text) is None
