"""Prompt use: the diagnostics (`avr.conditioning`), and the ladder's first rung
(`avr.research.ladder`) as a test that conditioning learns."""

import dataclasses

import numpy as np
import pytest
import torch

from avr.conditioning import (
    context_loss_ratio,
    copy_error,
    prompt_fidelity,
    sample_copy,
    sample_direct,
    shuffled_loss_ratio,
    swapped_input_loss,
)
from avr.defaults import tiny_model
from avr.research.ladder import RUNGS, climb


@pytest.mark.slow
def test_two_prompts_are_learned_apart_and_not_when_conditioning_is_cut():
    """Rung 1 (two prompts, two fixed images): after 180 steps the image loss with the other
    prompt is several times the loss with the right one; with every image trained
    unconditionally (`cfg_dropout` 1: the prompt is cut from the image's view) the two stay equal
    (the control needs fewer steps: 40 already fit the shared image mean).
    (Measured ratios: 1.2 after 120 steps, 4.2 after 180, 10–14 after 300; the control 1.0001.)"""
    ratios = {}
    for dropout, steps in ((0.0, 180), (1.0, 40)):
        config = dataclasses.replace(tiny_model(0).config, cfg_dropout=dropout, timestep_shift=3.0)
        result = climb(1, steps=steps, batch_size=8, config=config, eval_prompts=8, sample_steps=2)
        ratios[dropout] = result.loss_shuffled / result.loss_right
    assert ratios[0.0] > 3.0, ratios
    assert ratios[1.0] == pytest.approx(1.0, abs=0.1), ratios


def test_every_rung_draws_tasks_the_verifier_accepts(verifier):
    from avr.world import render

    for number, rung in RUNGS.items():
        rng = np.random.default_rng(number)
        for _ in range(4):
            spec, scene = rung.draw(rng)
            assert verifier.verify(render(scene), spec).correct, (number, spec.prompt)


def test_diagnostics_on_an_untrained_model():
    model = tiny_model(0)
    rng = np.random.default_rng(0)
    pairs = [RUNGS[4].draw(rng) for _ in range(6)]
    specs, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    summary, images = prompt_fidelity(model, specs, steps=2, batch_size=4)
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    assert set(summary) >= {"colour_precision", "shape_precision", "exact", "extra_per_image"}
    right, shuffled = shuffled_loss_ratio(model, specs, scenes)
    assert right > 0 and shuffled > 0
    assert model.training  # restored
    with pytest.raises(ValueError, match="at least two different prompts"):
        shuffled_loss_ratio(model, [specs[0]] * 2, scenes[:2])


def test_context_loss_ratio_judges_the_last_image_after_its_own_or_another_draft():
    """The refined image's loss depends on which draft is in its context (the clean latent and
    reader copies reach it), and on nothing else: with every draft swapped for an identical
    render the two losses are equal."""
    model = tiny_model(0)
    rng = np.random.default_rng(1)
    pairs = [RUNGS[5].draw(rng) for _ in range(6)]
    specs, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    own, other = context_loss_ratio(model, specs, scenes)
    assert own > 0 and other > 0 and abs(own - other) > 1e-6 * own  # untrained: a small change
    same, also_same = context_loss_ratio(model, [specs[0]] * 3, [scenes[0]] * 3)
    assert same == pytest.approx(also_same, rel=1e-7)
    assert model.training  # restored
    with pytest.raises(ValueError, match="two reflect trajectories"):
        context_loss_ratio(model, specs[:1], scenes[:1])


def test_the_copy_rung_reads_its_target_and_is_judged_against_it():
    """Rung 7's trajectories read the scene before drawing it; `swapped_input_loss` and
    `copy_error` tell the own input from another's, and cannot when every input is the same."""
    from avr.backbone import pack
    from avr.backbone.packing import GEN, LATENT

    model = tiny_model(0).eval()
    rung = RUNGS[7]
    assert rung.reads
    rng = np.random.default_rng(3)
    pairs = [rung.draw(rng) for _ in range(4)]
    specs, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    side = model.config.image_size
    batch = pack(
        [rung.trajectory(specs[0], scenes[0], side)], model.tokenizer, model.geometry, 2048, [0]
    )
    kinds = batch.token_type[0].tolist()
    assert kinds.index(LATENT) < kinds.index(GEN)  # the clean input comes before the drawn copy
    torch.testing.assert_close(batch.clean_pixels[0], batch.gen_pixels[0])
    own, swapped = swapped_input_loss(model, specs, scenes)
    assert abs(own - swapped) > 1e-6 * own
    same, also_same = swapped_input_loss(model, [specs[0]] * 3, [scenes[0]] * 3)
    assert same == pytest.approx(also_same, rel=1e-7)
    err_own, err_other, images = copy_error(model, specs, scenes, steps=2)
    assert images.shape == (4, side, side, 3) and 0 < err_own < 1 and err_own != err_other
    err_own, err_other, _ = copy_error(model, [specs[0]] * 2, [scenes[0]] * 2, steps=2)
    assert err_own == pytest.approx(err_other)
    with pytest.raises(ValueError, match="at least two scenes"):
        copy_error(model, specs[:1], scenes[:1])


def test_the_ladder_starts_a_rung_from_an_exported_model(tmp_path, capsys):
    """`python -m avr.research.ladder --from DIR --set KEY=JSON --save OUT`: the folder's weights
    with the override (a shape-preserving one such as `image_rope`), trained on the rung, judged,
    and saved with the override in their config."""
    from avr.backbone.io import from_pretrained, save_pretrained
    from avr.research.ladder import main as ladder

    start = tiny_model(0)
    save_pretrained(start, tmp_path / "start")
    argv = [
        "--rung",
        "7",
        "--steps",
        "2",
        "--batch",
        "2",
        "--n",
        "2",
    ]  # the first step warms up from lr 0
    argv += ["--from", str(tmp_path / "start"), "--set", 'image_rope="grid"', "--threads", "1"]
    assert ladder([*argv, "--save", str(tmp_path / "trained")]) == 0
    trained = from_pretrained(tmp_path / "trained")
    assert trained.config.image_rope == "grid"
    weight = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[weight], start.state_dict()[weight])
    out = capsys.readouterr().out
    flat = "".join(out.split())  # rich wraps long lines anywhere
    assert f"from{tmp_path / 'start'};" in flat and "{'image_rope':'grid'}" in flat
    assert "ladder rung 7, 2 steps x 2" in out and "copy error" in out


def test_the_flow_loss_diagnostics_refuse_another_backbone_at_once_naming_themselves():
    import avr.conditioning as conditioning
    from avr.defaults import tiny_janus
    from avr.world import sample_scene, sample_spec

    janus = tiny_janus(0)
    rng = np.random.default_rng(0)
    specs = [sample_spec("two_object", rng) for _ in range(2)]
    scenes = [sample_scene(s, rng) for s in specs]
    calls = {
        "shuffled_loss_ratio": (specs, scenes),
        "context_loss_ratio": (specs, scenes),
        "swapped_input_loss": (specs, scenes),
    }
    for name, args in calls.items():
        with pytest.raises(TypeError, match=rf"avr\.conditioning\.{name} needs a UnifiedModel"):
            getattr(conditioning, name)(janus, *args)


def test_sampled_diagnostics_roll_out_through_the_engine_on_any_backbone():
    """`prompt_fidelity` and `copy_error` draw through `avr.rollout` (the trajectories an
    evaluation would roll out), so they run on the Janus backbone too; `sample_direct` draws what
    a greedy `direct` evaluation draws with the same seeds and batches
    (matmul kernels may round a batch of 3 and one of 2 differently: an AMX Xeon does)."""
    from avr.defaults import tiny_janus
    from avr.policy import SamplingConfig
    from avr.registry import MODES
    from avr.rollout import Job, rollout, rollout_seed
    from avr.world import sample_scene, sample_spec

    rng = np.random.default_rng(1)
    specs = [sample_spec("two_object", rng) for _ in range(3)]
    scenes = [sample_scene(s, rng) for s in specs]
    janus = tiny_janus(0)
    summary, images = prompt_fidelity(janus, specs, steps=2)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert summary["asked_per_image"] == 2.0
    own, other, drawn = copy_error(janus, specs, scenes, steps=2)
    assert drawn.shape == (3, 64, 64, 3) and 0 < own < 1 and 0 < other < 1

    model = tiny_model(0)
    drawn = sample_direct(model, specs, steps=2, seed=5, batch_size=2)
    jobs = [Job(MODES.get("direct")(), s, rollout_seed(5, i)) for i, s in enumerate(specs)]
    evaluated = rollout(model.eval(), jobs, SamplingConfig(steps=2, temperature=0.0), max_batch=2)
    for image, trajectory in zip(drawn, evaluated, strict=True):
        assert np.array_equal(image, np.asarray(trajectory.final_image))
    with pytest.raises(ValueError, match="one input per prompt, got 1 for 3"):
        sample_copy(model, specs, images[:1])
