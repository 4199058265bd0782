"""The shipped models: each loads strictly with its recipe beside it, and the edit model reads
its drafts where the default does not (what its RECIPE.md claims, on fewer prompts)."""

from pathlib import Path

import pytest

from avr.backbone.io import from_pretrained
from avr.conditioning import context_loss_ratio
from avr.lit.callbacks import PromptUse

SHIPPED = sorted((Path(__file__).parents[1] / "checkpoints").iterdir())


@pytest.mark.parametrize("folder", SHIPPED, ids=[f.name for f in SHIPPED])
def test_every_shipped_model_loads_with_its_recipe(folder):
    model = from_pretrained(folder)
    assert (folder / "RECIPE.md").is_file()
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_the_edit_model_draws_its_refine_on_its_draft_and_the_default_does_not():
    """The refined image's flow loss after another trajectory's draft over after its own: the
    default ignores its draft (ratio ≈ 1), `shapeworld-tiny-edit` (grid RoPE, the copy rung)
    leans on it (1.59 on 96 prompts)."""
    use = PromptUse(prompts=24)
    root = Path(__file__).parents[1] / "checkpoints"
    ratios = {}
    for name in ("shapeworld-tiny-sft", "shapeworld-tiny-edit"):
        own, other = context_loss_ratio(from_pretrained(root / name), use.specs, use.scenes)
        ratios[name] = other / own
    assert ratios["shapeworld-tiny-sft"] == pytest.approx(1.0, abs=0.05), ratios
    assert ratios["shapeworld-tiny-edit"] > 1.3, ratios
