"""ShapeWorld, the embedded default world: scenes, prompts, renderer, verifier, complexity.

Data and pixels only: nothing here imports a model or a trainer.
"""

from avr.world.complexity import LEVELS, Complexity, complexity
from avr.world.prompts import (
    GENEVAL_TAGS,
    PLANNING_TAGS,
    TAGS,
    sample_scene,
    sample_spec,
    sample_specs,
)
from avr.world.render import degrade, render
from avr.world.scene import BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, Scene, SceneObject
from avr.world.spec import (
    Clause,
    PromptSpec,
    SpecError,
    VocabularyError,
    check_spec_vocabulary,
    load_specs,
    parse_line,
    parse_spec,
    save_specs,
)
from avr.world.verify import (
    ClauseResult,
    Detection,
    ProblemKind,
    Verdict,
    Verifier,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "GENEVAL_TAGS",
    "LEVELS",
    "PALETTE",
    "PLANNING_TAGS",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "Clause",
    "ClauseResult",
    "Complexity",
    "Detection",
    "ProblemKind",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "SpecError",
    "Verdict",
    "Verifier",
    "VocabularyError",
    "check_spec_vocabulary",
    "complexity",
    "degrade",
    "load_specs",
    "parse_line",
    "parse_spec",
    "render",
    "sample_scene",
    "sample_spec",
    "sample_specs",
    "save_specs",
]
