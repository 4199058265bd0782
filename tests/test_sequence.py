import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from avr.sequence import (
    ImageRole,
    Segment,
    Trajectory,
    TrajectoryError,
    check_tags,
    record_to_trajectory,
    trajectory_to_record,
)

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20).filter(
    lambda t: "<" not in t
)
_image = st.builds(
    lambda seed, side: Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    ),
    st.integers(0, 2**16),
    st.sampled_from([8, 16]),
)
_floats = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=4)
_segment = st.one_of(
    st.builds(
        lambda t, loss, lp: Segment(text=t, loss=loss, logprobs=lp),
        _text,
        st.booleans(),
        st.none() | _floats,
    ),
    st.builds(
        lambda im, role, lp: Segment(image=im, role=role, logprobs=lp),
        _image,
        st.sampled_from(list(ImageRole)),
        st.none() | _floats,
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_segment, max_size=6),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
def test_trajectory_round_trips_losslessly(tmp_path_factory, segments, meta):
    root = tmp_path_factory.mktemp("records")
    trajectory = Trajectory(segments, meta)
    line = json.dumps(trajectory_to_record(trajectory, "k", root))
    again = record_to_trajectory(json.loads(line), root, "x.jsonl:1")
    assert again.meta == trajectory.meta and len(again.segments) == len(segments)
    for a, b in zip(again.segments, segments, strict=True):
        assert (a.text, a.role, a.loss, a.logprobs, a.meta) == (
            b.text,
            b.role,
            b.loss,
            b.logprobs,
            b.meta,
        )
        if b.is_image:
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image.convert("RGB")))


def _record(tmp_path, segments):
    trajectory = Trajectory(segments)
    return trajectory_to_record(trajectory, "k", tmp_path)


def test_bad_records_name_file_line_and_what(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    record = _record(tmp_path, [Segment.prompt("a"), Segment(image=image, role="final")])
    (tmp_path / record["segments"][1]["image"]).write_bytes(b"not a png")
    with pytest.raises(
        TrajectoryError, match=r"d\.jsonl:4: segments\[1\]: .*k_1\.png: not a readable image"
    ):
        record_to_trajectory(record, tmp_path, "d.jsonl:4")
    (tmp_path / record["segments"][1]["image"]).unlink()
    with pytest.raises(
        TrajectoryError, match=r"d\.jsonl:4: segments\[1\]: image file .*k_1\.png not found"
    ):
        record_to_trajectory(record, tmp_path, "d.jsonl:4")
    record["segments"][1] = {"type": "video"}
    with pytest.raises(
        TrajectoryError,
        match=r"segments\[1\]: unknown segment type 'video'; expected 'text' or 'image'",
    ):
        record_to_trajectory(record, tmp_path, "d.jsonl:4")
    record["segments"][1] = {"type": "text", "text": "<refine>make it red"}
    with pytest.raises(
        TrajectoryError,
        match=r"d\.jsonl:4: text before segments\[2\]: unbalanced tags: <refine> is never closed",
    ):
        record_to_trajectory(record, tmp_path, "d.jsonl:4")
    record["segments"][1] = {"type": "image", "role": "final"}
    with pytest.raises(TrajectoryError, match=r"segments\[1\]: missing key 'image'"):
        record_to_trajectory(record, tmp_path, "d.jsonl:4")


def test_tags_balance_across_a_run_of_text(tmp_path):
    check_tags("<ins>a</ins><des>b</des> ok <refine>c</refine>")
    for bad, message in [
        ("<ins>a<des>b</des></ins>", "<des> opened inside <ins>"),
        ("</ins>", "closes nothing"),
        ("<ins>a</des>", "</des> at column 6 closes <ins>"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_tags(bad)
    # A policy's forced "<ins>" and its sampled rest are two segments of one run: that is balanced.
    record = _record(
        tmp_path,
        [Segment.prompt("p"), Segment(text="<ins>"), Segment(text="step 1 of 1</ins><des>x</des>")],
    )
    assert len(record_to_trajectory(record, tmp_path, "r:1").segments) == 3
