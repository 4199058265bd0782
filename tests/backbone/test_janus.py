"""The discrete-token backbone (transformers' Janus, tiny random config): the mode plugins run on
it unchanged, RL's teacher-forced replay agrees with the sampler, folders round-trip."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerFast

from avr.backbone import from_pretrained
from avr.backbone.janus import JanusBackbone, tiny_janus_config
from avr.backbone.protocol import Backbone
from avr.defaults import tiny_janus
from avr.export import main as export
from avr.fit import main as fit
from avr.policy import PolicyActor, SamplingConfig
from avr.registry import MODES
from avr.rollout import Job, rollout
from avr.world import sample_specs


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return tiny_janus().save_pretrained(tmp_path_factory.mktemp("janus") / "janus-tiny")


@pytest.fixture(scope="module")
def janus(janus_dir):
    return from_pretrained(janus_dir).eval()


def test_the_folder_round_trips_through_from_pretrained(janus):
    assert isinstance(janus, JanusBackbone) and janus.kind == "janus"
    assert isinstance(janus, Backbone)
    fresh = tiny_janus()
    assert janus.state_dict().keys() == fresh.state_dict().keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, janus.state_dict()[name]), name
    assert janus.config.image_size == 64 and janus.image_tokens == 16


@pytest.mark.parametrize("mode", ["direct", "reflect", "plan", "adaptive"])
def test_every_mode_runs_unchanged_and_replays_to_the_sampled_logprobs(janus, mode):
    """Through the rollout engine (one Janus episode at a time), as RL and evaluation run it."""
    specs = sample_specs(6, seed=1)[4:]
    sampling = SamplingConfig(noise_level=0.7, max_text_tokens=12, steps=2)
    jobs = [Job(MODES.get(mode)(), spec, 3) for spec in specs]
    trajectory, other = rollout(janus, jobs, sampling)
    assert other.images and other.images[-1].image.size == (64, 64)
    images = [s for s in trajectory.segments if s.is_image]
    assert images and images[-1].image.size == (64, 64)
    assert trajectory.meta["nfe"] == 16 * len(images)  # one LM pass per codebook token
    replay = janus.replay(trajectory, sampling.temperature)
    assert replay["image"].shape == (16 * len(images),)
    assert replay["text"].shape == replay["text_rollout"].shape
    for kind in ("text", "image"):
        torch.testing.assert_close(
            replay[kind].detach(), replay[f"{kind}_rollout"], rtol=0, atol=1e-4
        )


def test_greedy_drawing_is_deterministic_and_cfg_doubles_the_passes(janus):
    def draw(cfg, noise, seed):
        session = janus.session(1)
        session.append_tokens([[janus.tokenizer.bos_token_id]])
        session.append_text(["a red circle"])
        return session.generate_image(
            cfg_scale=cfg, noise_level=noise, generator=torch.Generator().manual_seed(seed)
        )

    a, b = draw(1.0, 0.0, 0), draw(1.0, 0.0, 1)
    assert torch.equal(a.latents, b.latents) and a.logprobs is None and a.nfe == 16
    c, d = draw(3.0, 1.0, 0), draw(3.0, 1.0, 1)
    assert c.nfe == 32 and c.logprobs.shape == (1, 16)
    assert not torch.equal(c.latents, d.latents)  # sampled: the seed matters
    assert (
        c.pixels.shape == (1, 3, 64, 64)
        and 0 <= float(c.pixels.min()) <= float(c.pixels.max()) <= 1
    )


def test_replay_trains_the_language_model_and_both_image_paths(janus):
    model = tiny_janus()
    actor = PolicyActor(
        model, SamplingConfig(noise_level=1.0, max_text_tokens=8), torch.Generator().manual_seed(0)
    )
    trajectory = MODES.get("reflect")().rollout(actor, sample_specs(2, seed=0)[1])
    replay = model.replay(trajectory)
    (replay["text"].sum() + replay["image"].sum()).backward()
    inner = model.janus.model
    assert inner.generation_head.vision_head.weight.grad.abs().sum() > 0
    assert inner.generation_embeddings.weight.grad.abs().sum() > 0
    assert inner.language_model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_a_plain_transformers_janus_folder_gets_avr_tokens(tmp_path):
    """A checkpoint as transformers writes it (no avr settings, a tokenizer without `<img>`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<｜end▁of▁sentence｜>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a red circle"] * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<｜end▁of▁sentence｜>")
    torch.manual_seed(0)
    JanusForConditionalGeneration(tiny_janus_config(len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert "<img>" in model.tokenizer.get_vocab() and "<mode:plan>" in model.tokenizer.get_vocab()
    assert model.janus.get_input_embeddings().num_embeddings >= len(model.tokenizer)
    with pytest.raises(ValueError, match="unknown Janus setting 'patch_size'"):
        from_pretrained(tmp_path, patch_size=8)


def test_sft_loss_targets_text_markers_and_vq_tokens_of_teacher_images(make_trajectories):
    model = tiny_janus().train()
    trajectories = make_trajectories(2)  # a direct one, and draft → critique → refined
    layout = model.layout(trajectories[1], teacher=True)
    start, end = model.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    targets = [layout.ids[i] for i in layout.text_at]
    assert targets.count(start) == 2 and targets.count(end) == 2  # both drawn images
    assert targets[-1] == model.tokenizer.eos_token_id  # the final critique is trained
    assert len(layout.image_at) == 2 * 16
    pixels = model._pixels(trajectories[1].segments[-2].image, "cpu")
    drawn = [layout.ids[i] for i in layout.image_at[16:]]
    assert drawn == model.encode_image_tokens(pixels)[0].tolist()  # the refined image's tokens
    loss, stats = model.sft_loss(trajectories)
    assert torch.isfinite(loss) and stats["tokens/image"] == 3 * 16
    loss.backward()
    assert model.janus.model.generation_head.vision_head.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.janus.model.vqmodel.parameters())


@pytest.mark.slow
def test_sft_config_trains_the_token_backbone(janus_dir, tmp_path):
    from avr.data.build import build, parse_mix

    data = tmp_path / "data"
    build(data, 6, parse_mix("simple=1,medium=1,complex=1"), seed=0)
    root = tmp_path / "sft"
    fit(
        [
            "experiments/sft.yaml",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--model.init_args.model.path={janus_dir}",
            f"--data.init_args.path={data}",
            "--data.init_args.batch_size=3",
            "--data.init_args.num_workers=0",
        ]
    )
    (checkpoint,) = Path(root).rglob("last.ckpt")
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0
    trained = from_pretrained(tmp_path / "export")
    before = from_pretrained(janus_dir)
    head = "janus.model.generation_head.vision_head.weight"
    assert not torch.equal(trained.state_dict()[head], before.state_dict()[head])
    vq = "janus.model.vqmodel.quantize.embedding.weight"
    assert torch.equal(trained.state_dict()[vq], before.state_dict()[vq])  # frozen


@pytest.mark.slow
def test_rl_config_trains_the_token_backbone_and_exports(janus_dir, tmp_path):
    fit(
        [
            "experiments/rl.yaml",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}',
            f"--model.init_args.model.path={janus_dir}",
            "--model.init_args.group_size=2",
            "--model.init_args.sampling.max_text_tokens=8",
            "--data.init_args.batch_size=1",
        ]
    )
    (metrics,) = Path(tmp_path).rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/reward")]
    assert len(rows) == 1 and float(rows[0]["train/image/tokens"]) >= 2 * 16
    assert float(rows[0]["train/image/logprob_gap"]) < 1e-3
    (checkpoint,) = Path(tmp_path).rglob("last.ckpt")
    assert export([str(checkpoint), "-o", str(tmp_path / "export")]) == 0
    exported = from_pretrained(tmp_path / "export")
    assert isinstance(exported, JanusBackbone)


def test_evaluate_compares_the_token_backbone_in_one_report(janus, tmp_path):
    from avr.evaluate import evaluate

    specs = sample_specs(3, seed=2)
    metrics = evaluate(
        {"janus": janus},
        specs,
        {"direct": MODES.get("direct")()},
        tmp_path,
        SamplingConfig(steps=2, temperature=0.0),
        grid_prompts=2,
    )
    run = metrics["runs"]["direct"]  # one model: runs are labelled by mode
    assert run["per_prompt"]["nfe"] == 16 and 0.0 <= run["overall"] <= 1.0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "direct").is_dir()


def test_a_token_backbone_refuses_the_ode_anchor_by_name(janus_dir):
    from avr.lit.base import ModelSettings
    from avr.lit.rl import RLModule
    from avr.lit.rl_settings import Replay
    from avr.policy import SamplingConfig

    sampling = SamplingConfig(max_text_tokens=4, noise_level=0.7, steps=2)
    module = RLModule(model=ModelSettings(path=str(janus_dir)), group_size=2, sampling=sampling,
                      replay=Replay(ode_anchor=0.01))  # fmt: skip
    with pytest.raises(ValueError, match="ode_anchor: JanusBackbone replays no denoising steps"):
        module.training_step(sample_specs(1, seed=0), 0)


def test_a_janus_folder_loads_strictly_or_not_at_all(janus_dir, tmp_path):
    """A missing weight is an error naming it, never a random one; a config of another size or
    family is refused from the files' headers, before a full-size model is allocated."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "missing"
    shutil.copytree(janus_dir, broken)
    weights = load_file(broken / "model.safetensors")
    (embed,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    del weights[embed]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing: \S*{re.escape(embed)}"):
        from_pretrained(broken)
    avr_config = tmp_path / "avr-config-named-janus"  # the default Janus would be 7B parameters
    shutil.copytree("checkpoints/shapeworld-tiny-sft", avr_config)
    config = json.loads((avr_config / "config.json").read_text())
    (avr_config / "config.json").write_text(json.dumps({**config, "model_type": "janus"}))
    with pytest.raises(
        ValueError, match=r"the weights do not match config\.json \(\d+ weights missing"
    ):
        from_pretrained(avr_config)
