"""SFT under bf16 autocast (`--trainer.precision bf16-mixed`, the fast path on CPUs with AVX512-BF16
or AMX) equals the float32 step to bf16's precision: the loss, and the gradient's direction and
size, on a batch of teacher trajectories of every mode."""

import numpy as np
import torch

from avr.backbone import from_pretrained
from avr.data.teacher import ShapeWorldTeacher
from avr.registry import MODES
from avr.world import sample_scene, sample_specs


def test_a_bf16_autocast_sft_step_equals_float32_to_bf16_precision():
    model = from_pretrained("shapeworld-tiny-sft").train()
    trajectories = []
    for i, spec in enumerate(sample_specs(6, seed=0)):
        rng = np.random.default_rng([0, i])
        teacher = ShapeWorldTeacher(sample_scene(spec, rng), rng, 64)
        trajectories.append(MODES.get(("direct", "reflect", "plan")[i % 3])().build(teacher, spec))
    batch = model.packer(2048)(trajectories, list(range(6)))

    def step(bf16: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, stats = model.sft_loss(batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.item(), stats, grad

    loss32, stats32, grad32 = step(False)
    loss16, stats16, grad16 = step(True)
    assert abs(loss16 - loss32) < 0.01 * loss32  # measured: 0.25% apart
    for key in ("loss/text", "loss/image"):
        assert abs(float(stats16[key]) - float(stats32[key])) < 0.01 * float(stats32[key])
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.995  # 0.9992
    assert 0.95 < grad16.norm() / grad32.norm() < 1.05  # 0.987
