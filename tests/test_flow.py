"""The sampler's time grid and Euler step against diffusers' `FlowMatchEulerDiscreteScheduler`.

The convention (`avr.flow.schedule`) is BAGEL's: `steps + 1` times uniform from 1 down to
0, each shifted by `s·t / (1 + (s − 1)·t)`. diffusers applies the same shift, but its default grid
runs from 1 to 1/1000 (then 0), so the two grids differ; given BAGEL's unshifted times as `sigmas`,
diffusers must give the same shifted grid and the same Euler steps, to rounding."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avr import flow


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (10, 1.0), (10, 3.0), (25, 2.5)])
def test_the_shifted_grid_and_euler_steps_equal_diffusers(steps, shift):
    ours = flow.schedule(steps, shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    uniform = torch.linspace(1.0, 0.0, steps + 1)[:-1]  # BAGEL's grid before the shift, no 0
    theirs.set_timesteps(sigmas=uniform.tolist())
    assert torch.allclose(theirs.sigmas.float(), ours, atol=1e-6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = x.clone()
    for i, timestep in enumerate(theirs.timesteps):
        v = torch.sin(3 * x + i)  # any velocity, the same for both
        x = theirs.step(v, timestep, x).prev_sample
        mine = flow.ode_step(mine, torch.sin(3 * mine + i), ours[i].item(), ours[i + 1].item())
    assert torch.allclose(x, mine, atol=1e-5)


def test_diffusers_default_grid_is_not_bagel_s():
    """What the grids' difference is, so that nobody swaps one for the other unawares: diffusers'
    default grid stops at σ = 1/1000 before 0 and is spaced over [1, 1/1000], not [1, 0]."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(10)
    gap = (theirs.sigmas.float() - flow.schedule(10, 3.0)).abs().max().item()
    assert gap > 0.01
