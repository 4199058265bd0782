"""Fixtures: the tiny seeded model (built once) and small ShapeWorld trajectories."""

from __future__ import annotations

import numpy as np
import pytest

from avr.defaults import tiny_model
from avr.sequence import Segment, Trajectory
from avr.world import render, sample_scene, sample_specs


@pytest.fixture(scope="session")
def model():
    return tiny_model(seed=0).eval()


def _make_trajectories(n: int = 4, seed: int = 0) -> list[Trajectory]:
    """Direct trajectories and reflect-shaped ones (draft → critique → refined) alternately."""
    specs = sample_specs(n, seed=seed)
    out = []
    for i, spec in enumerate(specs):
        image = render(sample_scene(spec, np.random.default_rng([seed, i])))
        if i % 2 == 0:
            segments = [Segment.prompt(spec.prompt), Segment(image=image, role="final")]
        else:
            draft = render(sample_scene(spec, np.random.default_rng([seed, i, 1])))
            segments = [
                Segment.prompt(spec.prompt),
                Segment(image=draft, role="draft"),
                Segment(text="<refine>move the square left</refine>"),
                Segment(image=image, role="refined"),
                Segment(text="done"),
            ]
        out.append(Trajectory(segments))
    return out


@pytest.fixture()
def make_trajectories():
    return _make_trajectories


@pytest.fixture()
def trajectories():
    return _make_trajectories()
