"""Shared fixtures: one seeded verifier and a small seeded prompt set with its scenes."""

from __future__ import annotations

import numpy as np
import pytest

from avr.world import Verifier, sample_scene, sample_specs


@pytest.fixture(autouse=True)
def _float32_fits(monkeypatch):
    """`avr.fit` trains in bf16-mixed on CPUs with fast bf16 (`avr.fit.cpu_precision`); the suite
    runs float32 on every CPU so its figures do not depend on the machine CI draws (the choice
    itself is tested with the flags set by hand)."""
    import avr.fit

    monkeypatch.setattr(avr.fit, "cpu_bf16", lambda: set())


@pytest.fixture(scope="session")
def verifier() -> Verifier:
    return Verifier()


@pytest.fixture(scope="session")
def specs_and_scenes():
    """Forty specs over every tag, each with a scene that satisfies it."""
    specs = sample_specs(40, seed=123)
    return [(s, sample_scene(s, np.random.default_rng([123, i]))) for i, s in enumerate(specs)]


@pytest.fixture(scope="session")
def bagel_dir(tmp_path_factory):
    """A tiny random checkpoint folder in BAGEL's published layout (see `bagel_layout`)."""
    from bagel_layout import write_bagel

    return write_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")
