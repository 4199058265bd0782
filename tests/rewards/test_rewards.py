import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from avr.data.teacher import ShapeWorldTeacher
from avr.registry import MODES, REWARDS, list_rewards
from avr.reward import CompositeReward, Reward, RewardTerm, Rollouts
from avr.sequence import Segment, Trajectory
from avr.world import render, sample_scene, sample_specs

SPEC = sample_specs(1, ["multi_count"], seed=2)[0]
SCENE = sample_scene(SPEC, np.random.default_rng(0))


def _traj(mode, seed=0, **kw):
    teacher = ShapeWorldTeacher(SCENE, np.random.default_rng(seed), **kw)
    return MODES.get(mode)().build(teacher, SPEC)


def _direct(image, nfe):
    return Trajectory(
        [Segment.prompt(SPEC.prompt), Segment(image=image, role="final")],
        {"nfe": nfe, "spec": SPEC.to_json(), "mode": "direct"},
    )


BLANK = Image.new("RGB", (64, 64), "white")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP model and processor saved where `CLIPScoreReward(path)` reads them."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )

    from avr.defaults import shapeworld_tokenizer

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    text = {
        "vocab_size": 600,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(path)
    bpe = shapeworld_tokenizer().backend_tokenizer
    tokenizer = CLIPTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|pad|>",
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", list_rewards())
def test_every_reward_scores_one_value_per_rollout_and_accumulates(name, tiny_clip):
    reward = REWARDS.get(name)(**({"path": tiny_clip} if name == "clip_score" else {}))
    rollouts = Rollouts.of(
        [_traj("direct"), _traj("reflect"), _traj("plan"), _direct(BLANK, 25)], groups=[0, 0, 0, 0]
    )
    scores = reward.score(rollouts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    reward.update(rollouts)
    valid = scores[~torch.isnan(scores)]
    assert reward.compute().item() == pytest.approx(
        valid.mean().item() if len(valid) else float("nan"), nan_ok=True
    )


def test_compositional_partial_and_strict():
    from avr.rewards.compositional import CompositionalReward

    good, half = render(SCENE), render(SCENE.remove(0))
    rollouts = Rollouts.of([_direct(good, 1), _direct(half, 1), _direct(BLANK, 1)])
    partial = CompositionalReward().score(rollouts).tolist()
    assert partial[0] == 1.0 and 0.0 < partial[1] < 1.0 and partial[2] < partial[1]
    assert CompositionalReward(strict=True).score(rollouts).tolist() == [1.0, 0.0, 0.0]


def test_compositional_extra_penalty_charges_objects_the_prompt_did_not_ask_for(verifier):
    from avr.rewards.compositional import CompositionalReward

    from avr.world.scene import SceneObject

    asked = len(SCENE)
    extra = None
    for x, y in ((0.08, 0.08), (0.92, 0.08), (0.08, 0.92), (0.92, 0.92), (0.5, 0.08)):
        candidate = SCENE.add(SceneObject("circle", "red", x, y, 0.1))
        if len(verifier.verify(render(candidate), SPEC).detections) == asked + 1:
            extra = candidate
            break
    assert extra is not None, "no free corner for an extra object"
    rollouts = Rollouts.of([_direct(render(SCENE), 1), _direct(render(extra), 1)])
    geneval = CompositionalReward().score(rollouts).tolist()
    assert geneval[0] == geneval[1] == 1.0  # at-least semantics credit the extra shape
    precise = CompositionalReward(extra_penalty=0.25).score(rollouts).tolist()
    assert precise == pytest.approx([1.0, 0.75])
    assert CompositionalReward(strict=True, extra_penalty=2.0).score(rollouts).tolist() == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="extra_penalty must be ≥ 0"):
        CompositionalReward(extra_penalty=-1)


def test_clean_background_prices_speckles_the_verifier_cannot_see(verifier):
    from avr.rewards.background import CleanBackgroundReward

    clean = render(SCENE)
    pixels = np.asarray(clean).copy()
    background = verifier.background(clean)
    assert background.mean() > 0.5 and not background.all()  # the objects are not background
    # less their anti-aliased rims, as the reward counts them
    background &= ~ndimage.binary_dilation(~background, iterations=2)
    speckled = pixels.copy()
    speckled[::4, ::4][background[::4, ::4]] = 238  # a faint grid of pale grey specks
    speckled = Image.fromarray(speckled)
    # the specks change nothing the compositional reward sees ...
    assert verifier.verify(speckled, SPEC).correct and verifier.verify(clean, SPEC).correct
    rollouts = Rollouts.of([_direct(clean, 1), _direct(speckled, 1), _direct(BLANK, 1)])
    scores = CleanBackgroundReward().score(rollouts).tolist()
    # ... but one background pixel in 16 is no longer white
    assert scores[0] == scores[2] == 1.0
    assert scores[1] == pytest.approx(1 - background[::4, ::4].sum() / background.sum())
    assert CleanBackgroundReward(tolerance=20).score(rollouts).tolist() == [1.0, 1.0, 1.0]
    assert CleanBackgroundReward.judges_images  # it moves the image generator in RL
    with pytest.raises(ValueError, match="tolerance must be in"):
        CleanBackgroundReward(tolerance=300)


def test_complexity_penalty_charges_extra_compute_relative_to_the_cheapest_success():
    from avr.rewards.complexity_penalty import ComplexityPenalty

    good = render(SCENE)
    rollouts = Rollouts.of(
        [
            _direct(good, 25),
            _direct(good, 50),
            _direct(BLANK, 100),
            _direct(BLANK, 25),
            _direct(BLANK, 75),
        ],
        groups=[0, 0, 0, 1, 1],
    )
    assert ComplexityPenalty().score(rollouts).tolist() == [
        0.0,
        -1.0,
        -1.0,
        0.0,
        0.0,
    ]  # group 1: none succeeded
    rollouts = Rollouts.of([_direct(good, 40), _direct(good, 50)], groups=[0, 0])
    assert ComplexityPenalty().score(rollouts).tolist() == pytest.approx([0.0, -0.25])


def test_format_reward_accepts_teacher_trajectories_and_rejects_broken_ones():
    from avr.rewards.format import FormatReward

    good = [_traj("direct"), _traj("reflect"), _traj("plan"), _traj("adaptive")]
    assert FormatReward().score(Rollouts.of(good)).tolist() == [1.0] * 4
    broken = _traj("reflect")
    broken.segments[3].text = broken.segments[3].text.replace(
        "</refine>", ""
    )  # prompt, token, draft
    wrong_mode = _traj("adaptive")
    wrong_mode.segments[1].text = "<mode:direct>"
    plan = _traj("plan")
    plan.segments[2].text = plan.segments[2].text.replace("step 1 of", "step 2 of")
    assert FormatReward().score(Rollouts.of([broken, wrong_mode, plan])).tolist() == [0.0, 0.0, 0.0]


def test_stepwise_reward_credits_right_steps_and_is_nan_without_steps():
    from avr.rewards.stepwise import StepwiseReasoningReward

    reward = StepwiseReasoningReward()
    teacher = [_traj("reflect"), _traj("plan", sketch_error_rate=0.0)]
    scores = reward.score(Rollouts.of([*teacher, _traj("direct")]))
    assert scores[:2].tolist() == [
        1.0,
        1.0,
    ]  # the teacher's steps, critiques and refinements are right
    assert math.isnan(scores[2].item())
    flawed = _traj("plan", sketch_error_rate=1.0)  # every sketch drawn wrong, then refined
    steps = len(SPEC.include)
    # per step: a wrong first sketch (0), a right critique (1), a better redraw (1), a right verdict (1)
    assert reward.score(Rollouts.of([flawed])).item() == pytest.approx(3 * steps / (4 * steps))
    lying = _traj("reflect")
    lying.segments[
        -1
    ].text = "wrong. <refine>add a circle</refine>"  # says the refined image is wrong
    assert reward.score(Rollouts.of([lying])).item() == pytest.approx(2 / 3)


def test_composite_keeps_names_with_weights_and_ignores_nan():
    from avr.rewards.compositional import CompositionalReward
    from avr.rewards.stepwise import StepwiseReasoningReward

    composite = CompositeReward(
        {
            "accuracy": RewardTerm(CompositionalReward(), 1.0),
            "steps": RewardTerm(StepwiseReasoningReward(), 0.5),
        }
    )
    rollouts = Rollouts.of([_traj("direct"), _direct(BLANK, 1)])
    total, parts = composite.score_parts(rollouts)
    assert set(parts) == {"accuracy", "steps"} and torch.isnan(parts["steps"]).all()
    assert total.tolist() == parts["accuracy"].tolist()
    with pytest.raises(ValueError, match="at least one term"):
        CompositeReward({})


class _Fixed(Reward):  # fixed scores, one per rollout
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def score(self, rollouts):
        return torch.tensor(self.scores, dtype=torch.float32)


def test_composite_keeps_infinite_scores_and_fills_nan_as_each_term_says():
    rollouts = Rollouts.of([_direct(BLANK, 1)] * 3)
    inf = float("inf")
    composite = CompositeReward(
        {"a": RewardTerm(_Fixed([inf, 0.5, -inf]), 1.0), "b": RewardTerm(_Fixed([1, 1, 1]), 1.0)}
    )
    assert composite.score(rollouts).tolist() == [inf, 1.5, -inf]  # not clamped to ±3.4e38
    nan = float("nan")
    zero = CompositeReward({"a": RewardTerm(_Fixed([nan, 0.5, 1.0]), 2.0)})
    assert zero.score(rollouts).tolist() == [0.0, 1.0, 2.0]
    given = CompositeReward({"a": RewardTerm(_Fixed([nan, 0.5, 1.0]), 2.0, missing=0.25)})
    assert given.score(rollouts).tolist() == [0.5, 1.0, 2.0]
    kept = CompositeReward({"a": RewardTerm(_Fixed([nan, 0.5, 1.0]), 2.0, missing=None)})
    assert math.isnan(kept.score(rollouts)[0]) and kept.score(rollouts)[1:].tolist() == [1.0, 2.0]


def test_clip_score_reward_with_a_tiny_random_clip(tiny_clip, tmp_path):
    from avr.rewards.clip import CLIPScoreReward
    from transformers import CLIPModel, CLIPProcessor

    reward = CLIPScoreReward(tiny_clip)
    trajectories = [_traj("direct"), _direct(BLANK, 1)]
    scores = reward.score(Rollouts.of(trajectories))
    model, processor = (
        CLIPModel.from_pretrained(tiny_clip),
        CLIPProcessor.from_pretrained(tiny_clip),
    )
    for trajectory, score in zip(
        trajectories, scores, strict=True
    ):  # the same number, computed directly
        inputs = processor(
            text=[SPEC.prompt], images=[trajectory.final_image], return_tensors="pt", padding=True
        )
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text = model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image, text).item()
        assert score.item() == pytest.approx(max(cosine, 0.0), abs=1e-4)
    with pytest.raises(FileNotFoundError, match="not a folder with a saved CLIPModel"):
        CLIPScoreReward(str(tmp_path / "missing"))


def test_in_rl_yaml_an_honest_critique_pays_more_than_calling_a_wrong_draft_right():
    """A wrong draft, in a group where another rollout succeeded at direct's cost: the honest
    rollout says "wrong", refines, fails again and says so (twice the compute); the dishonest one
    says "matches" and stops. Without the critique term the compute penalty pays the lie."""
    from omegaconf import OmegaConf

    from avr.data.critique import OK_IMAGE

    honest = _traj("reflect")  # prompt, token, wrong draft, critique, refined, critique
    draft = honest.segments[2]
    honest.segments[4] = Segment(image=draft.image, role="refined")  # the refine fixed nothing
    honest.segments[5] = Segment(text=honest.segments[3].text)  # and says so again
    honest.meta["nfe"] = 20
    liar = Trajectory([*honest.segments[:3], Segment(text=OK_IMAGE)], {**honest.meta, "nfe": 10})
    success = _direct(render(SCENE), 10)
    rollouts = Rollouts.of([honest, liar, success], groups=[0, 0, 0])
    terms = OmegaConf.to_container(OmegaConf.load("experiments/rl.yaml"))["model"]["init_args"][
        "rewards"
    ]

    def composite(names):
        built = {}
        for name in names:
            spec = terms[name]["reward"]
            module, _, cls = spec["class_path"].rpartition(".")
            reward = getattr(__import__(module, fromlist=[cls]), cls)(**spec.get("init_args", {}))
            built[name] = RewardTerm(reward, terms[name]["weight"])
        return CompositeReward(built).score(rollouts)

    assert "critique" in terms
    with_critique = composite(terms)
    assert with_critique[0] > with_critique[1] + 0.1
    without = composite([n for n in terms if n != "critique"])
    assert without[0] < without[1]  # the compute penalty alone would teach "matches"
