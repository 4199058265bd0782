"""The ablation notebook runs top to bottom on tiny settings (a cell injected after its parameters
cell, as papermill does), and draws its plots."""

import nbformat
import pytest
from nbclient import NotebookClient

TINY = """\
N_PROMPTS = 4
CLAIM_PROMPTS = 3
WORKERS = 1
STEPS = 2
MAX_TEXT_TOKENS = 12
REFLECT_ROUNDS = [1, 2]
PENALTY_WEIGHTS = [0.0, 1.0]
RL_STEPS = 1
RL_OVERRIDES = [
    "--model.init_args.group_size", "2",
    "--data.init_args.batch_size", "1",
    "--model.init_args.sampling.steps", "2",
    "--model.init_args.sampling.max_text_tokens", "12",
    "--trainer.enable_checkpointing", "false",
    "--trainer.callbacks", "[]",
]
OUT = {out!r}
"""


@pytest.mark.slow
def test_ablations_notebook_runs_on_tiny_settings(pytestconfig, tmp_path):
    root = pytestconfig.rootpath
    nb = nbformat.read(root / "notebooks" / "ablations.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(TINY.format(out=str(tmp_path / "out"))))
    NotebookClient(
        nb, timeout=300, resources={"metadata": {"path": str(root / "notebooks")}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    plots = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(plots) == 4  # claims per level, accuracy vs NFE for the modes, rounds k, penalty
    claims = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert (
        len(claims) == 1
        and "| claim | measured as | verdict | numbers |" in (claims[0]["data"]["text/markdown"])
    )
    assert "| RL improves on SFT | RL − SFT, adaptive |" in claims[0]["data"]["text/markdown"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for label in ("adaptive-no-reflect", "k2", "w1.0"):
        assert label in printed
    assert (tmp_path / "out" / "penalty" / "w1.0" / "adaptive" / "trajectories.png").is_file()
