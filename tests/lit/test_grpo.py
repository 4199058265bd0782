import pytest
import torch

from avr.grpo import PolicyLoss, group_advantages, k3


def test_group_advantages_are_centred_per_group_and_zero_for_ties():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2])
    adv = group_advantages(rewards, [0, 0, 1, 1, 2, 2])
    assert adv[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-4)
    assert adv[2:].tolist() == [0.0, 0.0, 0.0, 0.0]  # all-equal groups: no signal, no NaN
    unscaled = group_advantages(rewards, [0, 0, 1, 1, 2, 2], scale_std=False)
    assert unscaled[:2].tolist() == pytest.approx([0.5, -0.5])
    assert group_advantages(
        torch.tensor([10.0, 0.0]), [0, 0], scale_std=False, clip=2.0
    ).tolist() == [2.0, -2.0]


def test_ppo_clip_and_k3():
    loss_fn = PolicyLoss(clip_eps=0.2, kl_coef=0.0)
    logp = torch.log(torch.tensor([0.5, 0.5], requires_grad=True))
    old = torch.log(torch.tensor([0.25, 0.5]))  # ratio 2 (clipped to 1.2) and 1
    adv = torch.tensor([1.0, -1.0])
    loss, stats = loss_fn(logp, old, adv, torch.zeros(2))
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 1.0 * -1.0) / 2)
    assert stats["clipped"].item() == 0.5
    assert k3(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    assert (k3(torch.randn(100), torch.randn(100)) >= 0).all()
