"""Every registered mode builds teacher trajectories and rolls out with the tiny policy."""

import numpy as np
import pytest
import torch
from PIL import Image

from avr.backbone.packing import pack
from avr.data.critique import is_verdict_ok
from avr.data.teacher import ShapeWorldTeacher
from avr.defaults import tiny_model
from avr.policy import PolicyActor, SamplingConfig
from avr.protocol import Critique
from avr.registry import MODES, list_modes
from avr.rollout import Job, rollout
from avr.sequence import ImageRole, TrajectoryError, tries
from avr.world import Verifier, render, sample_scene, sample_specs

SPECS = {
    tag: sample_specs(1, [tag], seed=5)[0]
    for tag in ("colors", "counting", "position", "multi_count", "multi_relation")
}
BUILTIN = ("direct", "reflect", "plan", "adaptive")


def _teacher(spec, seed=0, **kwargs):
    return ShapeWorldTeacher(
        sample_scene(spec, np.random.default_rng(seed)), np.random.default_rng(seed), **kwargs
    )


@pytest.fixture(scope="module")
def policy_model():
    return tiny_model(0).eval()


@pytest.mark.parametrize("mode", [m for m in list_modes() if m in BUILTIN])
@pytest.mark.parametrize("tag", sorted(SPECS))
def test_teacher_trajectories_end_on_a_correct_image(mode, tag):
    spec = SPECS[tag]
    trajectory = MODES.get(mode)().build(_teacher(spec, sketch_error_rate=0.5), spec)
    assert trajectory.segments[0].text == spec.prompt and not trajectory.segments[0].loss
    assert Verifier().verify(trajectory.final_image, spec).correct
    assert trajectory.meta["mode"] in BUILTIN and trajectory.meta["spec"] == spec.to_json()


def test_reflect_drafts_carry_real_errors_and_critiques_name_them():
    for seed in range(12):
        spec = SPECS["multi_count"]
        trajectory = MODES.get("reflect")().build(_teacher(spec, seed), spec)
        token = trajectory.segments[1]
        assert token.text == "<mode:reflect>" and not token.loss  # read, as a forced mode's
        kinds = [s.role if s.is_image else s.text for s in trajectory.segments[2:]]
        assert (
            kinds[0] is ImageRole.DRAFT
            and not Verifier().verify(trajectory.segments[2].image, spec).correct
        )
        assert "<refine>" in kinds[1] and kinds[2] is ImageRole.REFINED
        assert is_verdict_ok(kinds[3]) and len(kinds) == 4


def test_plan_steps_follow_the_spec_and_sketches_grow():
    spec = SPECS["multi_relation"]
    trajectory = MODES.get("plan")().build(_teacher(spec, sketch_error_rate=0.0), spec)
    plans = [s.text for s in trajectory.segments if not s.is_image and s.text.startswith("<ins>")]
    assert len(plans) == len(spec.include)
    assert plans[0].startswith(f"<ins>step 1 of {len(spec.include)}: add a")
    counts = [len(Verifier().detect(s.image)) for s in trajectory.images]
    assert counts == list(range(1, len(spec.include) + 1))
    assert [s.role for s in trajectory.images][-1] is ImageRole.FINAL


def test_adaptive_labels_by_level_or_by_the_cheapest_mode_that_succeeds():
    labels = {
        tag: MODES.get("adaptive")().build(_teacher(spec), spec).meta["mode"]
        for tag, spec in SPECS.items()
    }
    assert labels == {
        "colors": "direct",
        "counting": "reflect",
        "position": "reflect",
        "multi_count": "plan",
        "multi_relation": "plan",
    }
    spec = SPECS["multi_count"]
    tried = []
    teacher = _teacher(spec, mode_succeeds=lambda mode, s: tried.append(mode) or mode == "reflect")
    trajectory = MODES.get("adaptive")().build(teacher, spec)
    assert trajectory.meta["mode"] == "reflect" and tried == ["direct", "reflect"]
    assert trajectory.segments[1].text == "<mode:reflect>"


def test_self_sampled_drafts_come_from_the_given_model():
    spec = SPECS["colors"]
    drawn = []

    def draw(s):  # stands in for a trained model that draws nothing
        drawn.append(s)
        return Image.new("RGB", (64, 64), "white")

    trajectory = MODES.get("reflect")().build(_teacher(spec, draft_model=draw), spec)
    assert drawn == [spec]
    clause = spec.include[0]
    assert trajectory.segments[3].text.startswith(
        f"there is no {clause.color} {clause.cls}. <refine>add a"
    )


@pytest.mark.parametrize("mode", BUILTIN)
def test_policy_rollouts_carry_log_probs_and_compute(policy_model, mode):
    spec = SPECS["multi_count"]
    sampling = SamplingConfig(steps=3, max_text_tokens=6, noise_level=0.7)

    def run(seed):
        return MODES.get(mode)().rollout(
            PolicyActor(policy_model, sampling, torch.Generator().manual_seed(seed)), spec
        )

    trajectory = run(0)
    images = trajectory.images
    assert images and all(len(s.logprobs) == 3 for s in images)
    assert trajectory.meta["nfe"] == 3 * len(images)
    sampled = [s for s in trajectory.segments[1:] if not s.is_image and s.logprobs is not None]
    assert trajectory.meta["text_tokens"] == sum(len(s.logprobs) for s in sampled)
    again = run(0)
    assert [s.text for s in again.segments] == [s.text for s in trajectory.segments]
    assert np.array_equal(np.asarray(again.final_image), np.asarray(trajectory.final_image))


#: What a trajectory of each built-in mode holds right after its mode token.
OPENING = {
    "direct": ImageRole.FINAL,
    "reflect": ImageRole.DRAFT,
    "retry": ImageRole.DRAFT,
    "plan": "<ins>",
}


@pytest.mark.parametrize("mode", list_modes())
def test_every_mode_rolls_out_as_it_was_trained(policy_model, mode):
    """Forced or chosen, a rollout starts as the trajectories the model learned from: the prompt,
    then the mode's token (scaffolded for a forced mode, sampled for adaptive's choice), then the
    mode's first step; the teacher lays a forced mode out the same way (the token read, not
    trained)."""
    spec = SPECS["multi_relation"]
    sampling = SamplingConfig(steps=2, max_text_tokens=6, temperature=0)
    rolled = MODES.get(mode)().rollout(
        PolicyActor(policy_model, sampling, torch.Generator().manual_seed(0)), spec
    )
    built = MODES.get(mode)().build(_teacher(spec), spec)
    chosen = MODES.get(rolled.meta["mode"])
    token = rolled.segments[1]
    assert rolled.segments[0].text == spec.prompt
    assert token.text == f"<mode:{chosen.token or chosen.name}>"
    assert (token.logprobs is not None) == (mode == "adaptive")  # sampled only when chosen
    built_mode = MODES.get(built.meta["mode"])
    assert built.segments[1].text == f"<mode:{built_mode.token or built_mode.name}>"
    assert built.segments[1].loss == (mode == "adaptive")  # a label is taught, a given mode read
    for trajectory in (rolled, built):
        first = trajectory.segments[2]
        opening = OPENING.get(trajectory.meta["mode"])
        if opening is not None:
            assert (first.role if first.is_image else first.text[:5]) == opening


class _Rejecting(PolicyActor):
    """The policy, but every critique is taken as "wrong"; keeps the generator's state at each
    restart."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.states = []

    def reflect(self, episode):
        return Critique(super().reflect(episode).text, False)

    def restart(self, episode):
        self.states.append(self.generator.get_state())
        super().restart(episode)


def test_retry_draws_each_try_in_a_fresh_context(policy_model):
    """A try after a rejected draft is drawn from the prompt alone: it equals a reflect rollout's
    first draft from the same random state, through the batched engine as through a plain actor."""
    spec = SPECS["counting"]
    sampling = SamplingConfig(steps=2, max_text_tokens=4, temperature=0)
    actors = []

    def rejecting(job, sampling, generator, open_session):
        actors.append(_Rejecting(policy_model, sampling, generator, open_session=open_session))
        return actors[-1]

    (rolled,) = rollout(
        policy_model, [Job(MODES.get("retry")(tries=3), spec, 5)], sampling, actor=rejecting
    )
    contexts = tries(rolled)
    assert len(contexts) == 3 and len(actors[0].states) == 2
    for context in contexts:
        assert [s.text for s in context.segments[:2]] == [spec.prompt, "<mode:reflect>"]
        assert [s.role for s in context.images] == [ImageRole.DRAFT]
    assert rolled.meta["nfe"] == 3 * 2
    for state, context in zip(actors[0].states, contexts[1:], strict=True):
        generator = torch.Generator()
        generator.set_state(state)
        fresh = MODES.get("reflect")().rollout(PolicyActor(policy_model, sampling, generator), spec)
        assert np.array_equal(np.asarray(fresh.images[0].image), np.asarray(context.final_image))
    assert not np.array_equal(  # the tries differ: new noise each time
        np.asarray(contexts[0].final_image), np.asarray(contexts[1].final_image)
    )


def test_retry_stops_at_the_first_draft_its_critic_accepts(policy_model):
    spec = SPECS["colors"]
    teacher = _teacher(spec, draft_model=lambda s: Image.new("RGB", (64, 64), "white"))
    rejected = MODES.get("retry")(tries=2).build(teacher, spec)
    assert len(tries(rejected)) == 2  # a blank draft is always wrong
    target = _teacher(spec).scene
    teacher = _teacher(spec, draft_model=lambda s: render(target, 64))
    accepted = MODES.get("retry")(tries=3).build(teacher, spec)
    assert len(tries(accepted)) == 1 and is_verdict_ok(accepted.segments[-1].text)
    with pytest.raises(TrajectoryError, match="2 tries, each in a fresh context"):
        pack([rejected], policy_model.tokenizer, policy_model.geometry, 2048)
    contexts = pack(tries(rejected), policy_model.tokenizer, policy_model.geometry, 2048)
    assert contexts.input_ids.shape[0] == 1  # both tries, packed apart in one row


def test_retry_is_refused_where_it_would_be_trained(tmp_path):
    from avr.data.build import build, parse_mix
    from avr.lit.rl import RLModule

    with pytest.raises(ValueError, match="--mode retry: its trajectories hold several contexts"):
        build(tmp_path / "data", 2, parse_mix("simple=1"), mode="reflect=0.5,retry=0.5")
    with pytest.raises(ValueError, match="mode 'retry': its rollouts hold several contexts"):
        RLModule(model=None, mode="retry")
    assert not (tmp_path / "data").exists()
