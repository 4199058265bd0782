import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avr.world import Clause, PromptSpec, SpecError, load_specs, parse_line, parse_spec, save_specs
from avr.world.scene import COLORS, RELATIONS, SHAPES

GENEVAL_SAMPLE = "tests/fixtures/geneval_metadata_sample.jsonl"


def test_real_geneval_metadata_reads_without_error(pytestconfig):
    specs = load_specs(pytestconfig.rootpath / GENEVAL_SAMPLE)
    assert [s.tag for s in specs] == [
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    ]
    assert specs[2].exclude == (Clause("clock", 3),)
    assert specs[4].include[1].position == ("right of", 0)
    assert specs[1].include[1].cls == "computer keyboard"


def test_line_round_trips_and_keeps_unknown_top_level_keys():
    line = json.dumps(
        {
            "tag": "position",
            "include": [
                {"class": "circle", "count": 1},
                {"class": "square", "position": ["above", 0]},
            ],
            "prompt": "a square above a circle",
            "note": {"kept": [1, 2]},
        }
    )
    spec = parse_line(line)
    assert spec.extra == {"note": {"kept": [1, 2]}}
    again = parse_line(spec.to_line())
    assert again == spec and again.extra == spec.extra
    assert again.include[1].count == 1  # GenEval's default


def test_save_and_load(tmp_path):
    specs = [
        PromptSpec("colors", "a red circle", (Clause("circle", 1, "red"),)),
        PromptSpec("counting", "two squares", (Clause("square", 2),), (Clause("square", 3),)),
    ]
    save_specs(specs, tmp_path / "p.jsonl")
    assert load_specs(tmp_path / "p.jsonl") == specs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"tag": "x", "prompt": "p"}', "missing required key 'include'"),
        ('{"tag": "x", "prompt": "p", "include": []}', "include: expected at least one clause"),
        (
            '{"tag": "x", "prompt": "p", "include": [{"count": 1}]}',
            "include[0]: missing required key 'class'",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "circle", "count": "two"}]}',
            "include[0].count: expected a positive integer, got 'two'",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "circle", "count": 0}]}',
            "include[0].count: expected a positive integer",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "circle", "colour": "red"}]}',
            "include[0]: unknown key 'colour'",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "a"}, {"class": "b", "position": ["near", 0]}]}',
            "include[1].position: relation 'near' is not one of",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "a", "position": ["above", 0]}]}',
            "include[0].position: the target index must name an earlier include clause",
        ),
        (
            '{"tag": "x", "prompt": "p", "include": [{"class": "a"}], "exclude": [{"class": "a", "position": ["above", 0]}]}',
            "exclude[0].position: only include clauses may have a position",
        ),
        (
            '{"tag": 3, "prompt": "p", "include": [{"class": "a"}]}',
            "tag: expected a non-empty string",
        ),
        ('["not", "an", "object"]', "expected a JSON object, got a list"),
        ('{"tag": "x", "prompt": ', "not valid JSON"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"tag": "colors", "prompt": "a red circle", "include": [{"class": "circle", "color": "red"}]}'
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(SpecError) as err:
        load_specs(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from([*SHAPES, *COLORS, *RELATIONS]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["tag", "prompt", "include", "exclude", "class", "count", "color", "position", "x"]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_json)
def test_parser_raises_only_spec_error(value):
    try:
        spec = parse_spec(value, "f.jsonl:7")
    except SpecError as err:
        assert str(err).startswith("f.jsonl:7: ")
    else:
        assert parse_line(spec.to_line()) == spec


_clause = st.builds(
    Clause,
    cls=st.sampled_from(SHAPES),
    count=st.integers(1, 4),
    color=st.none() | st.sampled_from(COLORS),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_clause, min_size=1, max_size=5), st.lists(_clause, max_size=2), st.data())
def test_valid_specs_round_trip(include, exclude, data):
    include = [
        Clause(
            c.cls,
            c.count,
            c.color,
            (data.draw(st.sampled_from(RELATIONS)), data.draw(st.integers(0, i - 1))),
        )
        if i and data.draw(st.booleans())
        else c
        for i, c in enumerate(include)
    ]
    spec = PromptSpec("t", "p", tuple(include), tuple(exclude))
    impossible = any(
        b.cls == w.cls and b.color in (None, w.color) and b.count <= w.count
        for w in include
        for b in exclude
    )
    if impossible:  # an exclude clause forbids what an include clause asks for
        with pytest.raises(SpecError, match="no image can satisfy this spec"):
            parse_line(spec.to_line())
    else:
        assert parse_line(spec.to_line()) == spec
