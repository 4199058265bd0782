from dataclasses import replace

import pytest
import torch

from avr.lit.rl import RLModule
from avr.lit.rl_settings import Advantages, Objective, Replay, Seeding
from avr.policy import SamplingConfig
from avr.reward import Reward, RewardTerm
from avr.world import sample_specs

SAMPLING = SamplingConfig(steps=3, max_text_tokens=8, noise_level=0.7)


class ConstantReward(Reward):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def score(self, rollouts):
        return torch.full((len(rollouts),), self.value)


def _module(**kwargs):
    return RLModule(model=None, seed=0, group_size=2, sampling=SAMPLING, **kwargs)


def test_first_step_ratio_is_exactly_one_and_log_probs_agree():
    module = _module(mode="adaptive")
    trajectories, _, _ = module.rollout(sample_specs(2, seed=0))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, stats = module.policy_loss(trajectories, advantages)
    assert stats["text/ratio"].item() == 1.0 and stats["image/ratio"].item() == 1.0
    assert stats["text/logprob_gap"].item() < 1e-2  # the sampler's log-probs are the trainer's
    assert stats["image/logprob_gap"].item() < 1e-3  # per SDE step, both per-dimension means
    loss.backward()
    assert module.backbone.velocity_out.weight.grad.abs().sum() > 0


def test_equal_rewards_give_no_gradient_and_no_nan():
    module = _module(
        mode="direct",
        rewards={"c": RewardTerm(ConstantReward(0.7), 1.0)},
        objective=Objective(kl_text=0.0, kl_image=0.0),
    )
    loss = module.training_step(sample_specs(2, seed=1), 0)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in module.backbone.parameters() if p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


class TextOnly(Reward):
    """Differs within every group, judges no image (like the format reward)."""

    def score(self, rollouts):
        return torch.arange(len(rollouts), dtype=torch.float32)


@pytest.mark.parametrize("image_rewards_only", [True, False])
def test_a_text_only_reward_does_not_move_the_image_generator(image_rewards_only):
    module = _module(
        mode="adaptive",
        rewards={"t": RewardTerm(TextOnly(), 1.0)},
        objective=Objective(kl_text=0.0, kl_image=0.0),
        advantages=Advantages(image_rewards_only=image_rewards_only),
    )
    loss = module.training_step(sample_specs(2, seed=3), 0)
    loss.backward()
    image_head = module.backbone.velocity_out.weight.grad
    text_head = module.backbone.lm.lm_head.weight.grad
    assert text_head is not None and text_head.abs().sum() > 0  # the text is trained
    moved = image_head is not None and bool(image_head.abs().sum() > 0)
    assert moved is not image_rewards_only


def test_mode_exploration_mixes_groups_and_weighs_by_the_behaviour_probability():
    import math

    from avr.grpo import behaviour_correction

    sampling = SamplingConfig(steps=2, max_text_tokens=4, noise_level=0.7, mode_temperature=50.0)
    module = RLModule(model=None, seed=0, group_size=4, sampling=sampling, mode="adaptive")
    trajectories, _, groups = module.rollout(sample_specs(3, seed=4))
    chosen = [t.segments[1] for t in trajectories]  # prompt, then the sampled mode token
    for segment in chosen:  # nearly uniform over 3 modes at temperature 50
        (mu,) = segment.behaviour_logprobs
        assert abs(mu - math.log(1 / 3)) < 0.1
    per_group = {}
    for g, t in zip(groups, trajectories, strict=True):
        per_group.setdefault(g, set()).add(t.meta["mode"])
    assert any(len(m) >= 2 for m in per_group.values())
    correction = behaviour_correction(trajectories, list(range(len(trajectories))))
    expected = chosen[0].behaviour_logprobs[0] - chosen[0].logprobs[0]
    assert correction[0].item() == pytest.approx(expected)  # μ replaces π_old on that token
    with pytest.raises(ValueError, match=r"sampling\.mode_temperature"):
        SamplingConfig(mode_temperature=0.0)


def test_ppo_epochs_reuse_a_rollout_batch_with_the_sampling_log_probs_as_pi_old():
    module = _module(mode="adaptive", objective=Objective(ppo_epochs=2))
    module.training_step(sample_specs(2, seed=5), 0)
    first = module._batch
    with torch.no_grad():  # the policy moves away from the one that sampled, as an update would
        for head in (module.backbone.lm.lm_head, module.backbone.velocity_out):
            head.weight.add_(0.05 * torch.randn_like(head.weight))
    module.training_step(sample_specs(2, seed=6), 1)  # a later epoch: the same rollouts
    assert module._batch is first
    assert first.updates == 2  # two updates on one rollout batch
    _, stats = module.policy_loss(
        first.trajectories, first.advantages, first.image_advantages, on_policy=False
    )
    assert stats["text/ratio"].item() != 1.0 and stats["image/ratio"].item() != 1.0
    assert stats["text/clipped"].item() > 0 and stats["image/clipped"].item() > 0  # the clip acts
    module.training_step(sample_specs(2, seed=7), 2)  # two epochs done: new rollouts
    assert module._batch is not first and module._batch.updates == 1
    with pytest.raises(ValueError, match="ppo_epochs must be ≥ 1"):
        _module(objective=Objective(ppo_epochs=0))


def test_a_mixed_ode_sde_rollout_trains_only_its_stochastic_steps():
    sampling = SamplingConfig(steps=4, max_text_tokens=4, noise_level=0.7, sde_window=(1, 3))
    module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct")
    assert module.replay.sde_window == (1, 3)  # the trainer's window follows the sampler's
    trajectories, _, _ = module.rollout(sample_specs(2, seed=8))
    for t in trajectories:
        (image,) = t.images
        assert image.logprobs[0] is None and image.logprobs[3] is None
        assert all(v is not None for v in image.logprobs[1:3])
    ((_, steps),) = module.backbone.rl_passes(
        trajectories, module._replay_plan()
    )  # one replay: both steps of each image
    assert len(steps) == 2 * len(trajectories)
    assert all(s.logprob is not None and s.t < 1.0 for s in steps)
    loss, stats = module.policy_loss(trajectories, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert torch.isfinite(loss) and stats["image/logprob_gap"] < 1e-3
    with pytest.raises(ValueError, match="draws with the ODE"):
        RLModule(model=None, group_size=2, sampling=sampling, replay=Replay(sde_window=(0, 2)))


def test_training_every_window_step_is_the_mean_of_training_each_step_alone():
    sampling = SamplingConfig(steps=3, max_text_tokens=4, noise_level=0.7)
    module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="reflect")
    trajectories, _, _ = module.rollout(sample_specs(2, seed=9))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    module.replay = Replay()
    whole, stats = module.policy_loss(trajectories, advantages)
    images = sum(len(t.images) for t in trajectories)
    assert stats["image/steps_trained"].item() == 3 * images
    assert stats["image/logprob_gap"].item() < 1e-3  # every block replays its own step
    alone = []
    for j in range(3):
        module.replay = Replay(sde_window=(j, j + 1))
        alone.append(module.policy_loss(trajectories, advantages)[0])
    assert whole.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5, abs=1e-7)
    from avr.backbone.packing import token_count

    backbone = module.backbone  # rows too short for three noisy blocks per image: two replays
    base = [token_count(t, backbone.tokenizer, backbone.geometry, rl=True) for t in trajectories]
    most = max(range(4), key=lambda b: (base[b], len(trajectories[b].images)))
    max_len = base[most] + backbone.geometry.gen_tokens * len(trajectories[most].images)
    module.replay = Replay(max_len=max_len)
    passes = module.backbone.rl_passes(trajectories, module._replay_plan())
    assert len(passes) == 2 and all(b.input_ids.shape[1] <= max_len for b, _ in passes)
    split, _ = module.policy_loss(trajectories, advantages)
    assert split.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7)
    module.replay = Replay(steps_per_image=1)  # one random step per image
    ((_, steps),) = module.backbone.rl_passes(trajectories, module._replay_plan())
    assert len(steps) == images
    with pytest.raises(ValueError, match="steps_per_image must be ≥ 1"):
        Replay(steps_per_image=0)


def test_cfg_rollouts_are_replayed_with_the_guidance_their_samples_recorded():
    sampling = SamplingConfig(steps=3, max_text_tokens=4, noise_level=0.7, cfg_scale=3.0)
    module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct")
    trajectories, _, _ = module.rollout(sample_specs(2, seed=10))
    loss, stats = module.policy_loss(trajectories, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert stats["image/logprob_gap"].item() < 1e-3  # the sampler's guided step, replayed
    # the replay reads the guidance each sample recorded, not the trainer's settings: record none
    guided = [t.images[0].sample for t in trajectories]
    for t in trajectories:
        t.images[0].sample = replace(t.images[0].sample, cfg_scale=1.0)
    _, unguided = module.policy_loss(trajectories, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    # without guidance the replay is another policy: its step log-probs are far off
    assert unguided["image/logprob_gap"].item() > 100 * stats["image/logprob_gap"].item()
    trajectories[0].images[0].sample = guided[0]  # one rollout guided, the others not: refused
    with pytest.raises(ValueError, match=r"different cfg_scale values \(\[1\.0, 3\.0\]\)"):
        module.policy_loss(trajectories, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    for t, sample in zip(trajectories, guided, strict=True):
        t.images[0].sample = sample
    loss.backward()
    assert module.backbone.velocity_out.weight.grad.abs().sum() > 0


def test_rollouts_under_bf16_mixed_are_the_float32_rollouts():
    """Lightning's `bf16-mixed` wraps the whole training step in autocast; the rollouts inside
    it leave autocast off, so their samples and recorded log-probs are the float32 path's."""
    specs = sample_specs(2, seed=3)
    plain, _, _ = _module(mode="adaptive").rollout(specs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _, _ = _module(mode="adaptive").rollout(specs)
    for a, b in zip(plain, mixed, strict=True):
        assert [g.text for g in a.segments] == [g.text for g in b.segments]
        for x, y in zip(a.images, b.images, strict=True):
            assert x.sample.latents.dtype == torch.float32
            assert torch.equal(x.sample.latents, y.sample.latents)


def test_a_group_can_share_its_starting_noise():
    sampling = SamplingConfig(steps=2, max_text_tokens=4, noise_level=0.7)
    shared = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct",
                      seeding=Seeding(shared_noise=True))  # fmt: skip
    own = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct")
    specs = sample_specs(2, seed=11)
    a, _, _ = shared.rollout(specs)
    b, _, _ = own.rollout(specs)
    start = [
        t.images[0].sample.latents[0] for t in a
    ]  # [1, N, D] each: the noise the image began at
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3])  # within a group
    assert not torch.equal(start[0], start[2])  # across groups
    assert not torch.equal(
        a[0].images[0].sample.latents[-1], a[1].images[0].sample.latents[-1]
    )  # SDE differs
    assert not torch.equal(b[0].images[0].sample.latents[0], b[1].images[0].sample.latents[0])


def test_prompt_seeded_rollouts_repeat_a_prompt_across_steps_and_step_seeded_do_not(monkeypatch):
    sampling = SamplingConfig(steps=2, max_text_tokens=4, noise_level=0.7)
    specs = sample_specs(2, seed=11)

    def final_images(by: str, step: int) -> list[torch.Tensor]:
        monkeypatch.setattr(RLModule, "global_step", property(lambda self: step))
        module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct",
                          seeding=Seeding(by=by))  # fmt: skip
        trajectories, _, _ = module.rollout(specs)
        return [t.images[0].sample.latents[-1] for t in trajectories]

    first, later = final_images("prompt", 0), final_images("prompt", 10)
    assert all(torch.equal(a, b) for a, b in zip(first, later, strict=True))
    assert not torch.equal(first[0], first[1])  # a group's samples still differ
    assert not torch.equal(first[0], first[2])  # and so do two prompts'
    stepped = final_images("step", 0), final_images("step", 10)
    assert not torch.equal(stepped[0][0], stepped[1][0])
    with pytest.raises(ValueError, match=r"seeding\.by: expected 'step' or 'prompt'"):
        Seeding(by="epoch")


def test_a_plan_whose_text_ends_by_opening_the_image_replays_as_sampled(monkeypatch):
    """The plan text may end with `<img>` at `max_text_tokens` (not a stop of the plan): the
    actor then draws without appending a second `<img>`, as the packer lays the rollout out, so
    the trainer's log-probs of the text after the image are the sampler's."""
    from avr.backbone.generation import TextSample
    from avr.backbone.tokenizer import IMAGE_START
    from avr.policy import PolicyActor

    module = _module(mode="plan")
    tok = module.backbone.tokenizer
    real = PolicyActor._text

    def plan_ends_with_img(self, episode, stop):
        if stop != ["</des>"]:
            return real(self, episode, stop)
        ids = tok.encode("step 1 of 1 a", add_special_tokens=False)
        ids = ids + tok.convert_tokens_to_ids([IMAGE_START])
        session = episode.state.session
        logps = []
        for token in ids:  # as sampling would: each token's log-prob, then append it
            logps.append(float(torch.log_softmax(session.last_logits[0].float(), -1)[token]))
            session.append_tokens([[token]])
        episode.state.text_tokens += len(ids)
        return TextSample([ids], [logps], [tok.decode(ids)])

    monkeypatch.setattr(PolicyActor, "_text", plan_ends_with_img)
    trajectories, _, _ = module.rollout(sample_specs(1, seed=12))
    segments = trajectories[0].segments
    opening = tok.convert_tokens_to_ids(IMAGE_START)
    opened = [
        i
        for i, seg in enumerate(segments[:-1])
        if not seg.is_image and seg.logprobs and seg.sample.ids[0][-1] == opening
    ]
    assert opened and all(segments[i + 1].is_image for i in opened)
    assert any(not seg.is_image for seg in segments[opened[0] + 2 :])  # text read after it
    _, stats = module.policy_loss(trajectories, torch.tensor([1.0, -1.0]))
    assert stats["text/logprob_gap"].item() < 1e-3  # 0.2–1.7 nats when `<img>` was doubled


class FirstInfinite(Reward):
    def score(self, rollouts):
        scores = torch.full((len(rollouts),), 0.5)
        scores[0] = float("inf")
        return scores


def test_one_infinite_reward_in_a_group_skips_the_step():
    module = _module(mode="direct", rewards={"c": RewardTerm(FirstInfinite(), 1.0)})
    assert module.training_step(sample_specs(1, seed=2), 0) is None
    assert module.skipped == 1 and module.bad_in_a_row == 1


def test_non_finite_rewards_skip_steps_then_stop():
    module = _module(
        mode="direct", rewards={"c": RewardTerm(ConstantReward(float("inf")), 1.0)}, max_bad_steps=2
    )
    assert module.training_step(sample_specs(1, seed=2), 0) is None
    assert module.skipped == 1
    with pytest.raises(
        RuntimeError, match=r"2 training steps in a row were skipped .*last good checkpoint is kept"
    ):
        module.training_step(sample_specs(1, seed=2), 1)


def test_rl_refuses_settings_it_cannot_train_with():
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        RLModule(sampling=SamplingConfig(noise_level=0.0))
    with pytest.raises(ValueError, match="group_size must be an integer of at least 2"):
        RLModule(group_size=1)
    with pytest.raises(ValueError, match=r"replay.sde_window must be \[first, last\)"):
        Replay(sde_window=(3, 3))
    with pytest.raises(ValueError, match=r"advantages.clip must be > 0"):
        Advantages(clip=0.0)


def test_trajectory_grid_shows_every_image_of_each_rollout():
    from avr.defaults import tiny_model
    from avr.lit.callbacks import TrajectoryGrid

    model = tiny_model(0)
    grid, texts = TrajectoryGrid(prompts=2, mode="reflect", steps=2, scale=2).grid(model)
    side = 2 * 64  # upscaled
    assert grid.dtype == "uint8" and grid.shape[0] == 2 * side and grid.shape[1] % side == 0
    assert len(texts) == 2 and all("→ reflect\n" in t for t in texts)  # then the critique
    images = grid.shape[1] // side - 2  # the text panel is two images wide
    assert images >= 1
    panel = grid[:side, images * side :]
    assert (panel < 128).any(), "the text panel is blank"
    one = TrajectoryGrid(prompts=2, mode="reflect", steps=2, scale=1).grid(model)[0]
    first = one[:64, :64]  # the first image, upscaled 2× by repetition in the big grid
    assert (grid[:side:2, :side:2] == first).all()


def test_the_loss_weighs_text_and_image_terms_and_zero_text_trains_the_generator_alone():
    trajectories, _, _ = _module(mode="adaptive").rollout(sample_specs(2, seed=4))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def grads(text_weight, image_weight):
        objective = Objective(text_weight=text_weight, image_weight=image_weight)
        module = _module(mode="adaptive", objective=objective)
        module.policy_loss(trajectories, advantages)[0].backward()
        return module.backbone.velocity_out.weight.grad, module.backbone.lm.lm_head.weight.grad

    image_1, text_1 = grads(1.0, 1.0)
    image_30, text_30 = grads(1.0, 30.0)
    image_alone, text_alone = grads(0.0, 1.0)
    assert image_alone.abs().sum() > 0 and text_1.abs().sum() > 0
    assert text_alone is None or text_alone.abs().sum() == 0  # the text is not trained
    torch.testing.assert_close(text_30, text_1)  # the image term does not reach the LM head
    torch.testing.assert_close(image_30, image_1 + 29 * image_alone)
    with pytest.raises(ValueError, match="not both 0"):
        Objective(text_weight=0.0, image_weight=0.0)


def test_the_ode_anchor_holds_the_untrained_steps_to_the_reference():
    from avr.grpo import AnchorStep, SdeStep

    sampling = SamplingConfig(steps=4, max_text_tokens=4, noise_level=0.7, sde_window=(1, 3))
    module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="direct",
                      replay=Replay(ode_anchor=10.0, anchor_steps=2))  # fmt: skip
    trajectories, _, _ = module.rollout(sample_specs(2, seed=12))
    ((_, steps),) = module.backbone.rl_passes(trajectories, module._replay_plan())
    anchors = [s for s in steps if isinstance(s, AnchorStep)]
    trained = [s for s in steps if isinstance(s, SdeStep)]
    times = trajectories[0].images[0].sample.timesteps
    assert len(anchors) == len(trained) == 2 * len(trajectories)
    assert {s.t for s in anchors} == {float(times[0]), float(times[3])}  # the ODE steps only
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():  # the policy's velocity moves away from the reference's
        module.backbone.velocity_out.weight.add_(
            0.05 * torch.randn_like(module.backbone.velocity_out.weight)
        )
    loss, stats = module.policy_loss(trajectories, advantages)
    module.replay = replace(module.replay, ode_anchor=0.0)
    plain, plain_stats = module.policy_loss(trajectories, advantages)
    assert "image/anchor" not in plain_stats and stats["image/anchor"].item() > 0
    # the anchor leaves the Flow-GRPO term as it was and adds its own, weighted
    assert stats["image/loss"].item() == pytest.approx(plain_stats["image/loss"].item(), abs=1e-7)
    assert stats["image/steps_trained"].item() == plain_stats["image/steps_trained"].item()
    assert (loss - plain).item() == pytest.approx(10.0 * stats["image/anchor"].item(), rel=1e-4)
    # a gradient step on the anchor alone brings the untrained steps back toward the reference
    module.replay = replace(module.replay, ode_anchor=1.0)
    module.backbone.zero_grad()
    _, before = module.policy_loss(trajectories, advantages)
    terms = module.backbone.policy_terms(trajectories, module._reference, module._replay_plan())
    terms["image"].anchor.mean().backward()
    with torch.no_grad():
        for p in module.backbone.parameters():
            if p.grad is not None:
                p.add_(-1e-3 * p.grad)
    _, after = module.policy_loss(trajectories, advantages)
    assert after["image/anchor"].item() < before["image/anchor"].item()
    with pytest.raises(ValueError, match="ode_anchor must be ≥ 0"):
        Replay(ode_anchor=-1.0)


def test_anchor_steps_fit_into_split_replays_even_a_replay_of_anchors_alone():
    from avr.backbone.packing import token_count
    from avr.grpo import AnchorStep

    sampling = SamplingConfig(steps=4, max_text_tokens=4, noise_level=0.7, sde_window=(1, 3))
    module = RLModule(model=None, seed=0, group_size=2, sampling=sampling, mode="reflect",
                      replay=Replay(ode_anchor=1.0))  # fmt: skip
    trajectories, _, _ = module.rollout(sample_specs(2, seed=9))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    whole, stats = module.policy_loss(trajectories, advantages)
    backbone = module.backbone  # rows too short for three noisy blocks per image: two replays
    base = [token_count(t, backbone.tokenizer, backbone.geometry, rl=True) for t in trajectories]
    most = max(range(4), key=lambda b: (base[b], len(trajectories[b].images)))
    max_len = base[most] + backbone.geometry.gen_tokens * len(trajectories[most].images)
    module.replay = replace(module.replay, max_len=max_len)
    passes = backbone.rl_passes(trajectories, module._replay_plan())
    assert len(passes) == 2 and all(isinstance(s, AnchorStep) for s in passes[1][1])
    split, split_stats = module.policy_loss(trajectories, advantages)
    assert torch.isfinite(split) and split.item() == pytest.approx(whole.item(), abs=1e-6)
    assert split_stats["image/steps_trained"] == stats["image/steps_trained"]
