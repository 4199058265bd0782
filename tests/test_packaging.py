from importlib.metadata import entry_points

import numpy as np
import torch
from PIL import Image

from avr.world import Clause, PromptSpec, Scene, SceneObject, render


def test_builtin_reward_is_registered_through_its_entry_point():
    (ep,) = [e for e in entry_points(group="avr.rewards") if e.name == "compositional"]
    reward_cls = ep.load()
    assert reward_cls.__module__ == "avr.rewards.compositional"


def test_compositional_reward_scores_per_sample_and_accumulates():
    from avr.rewards.compositional import CompositionalReward

    spec = PromptSpec("color_attr", "x", (Clause("circle", 1, "red"), Clause("square", 1, "blue")))
    scene = Scene(
        (SceneObject("circle", "red", 0.3, 0.5, 0.2), SceneObject("square", "blue", 0.7, 0.5, 0.2))
    )
    good = render(scene)
    half = render(scene.recolor(1, "green"))
    blank = Image.new("RGB", (64, 64), "white")
    partial, strict = CompositionalReward(), CompositionalReward(strict=True)
    assert partial.score([good, half, blank], [spec] * 3).tolist() == [1.0, 0.5, 0.0]
    assert strict.score([good, half, blank], [spec] * 3).tolist() == [1.0, 0.0, 0.0]
    tensor = torch.stack([torch.tensor(np.array(im)).permute(2, 0, 1) for im in (good, half)])
    partial.update(tensor.float() / 255, [spec, spec])
    partial.update([blank], [spec])
    assert abs(partial.compute().item() - 0.5) < 1e-6
