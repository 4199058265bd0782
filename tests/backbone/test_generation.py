import dataclasses

import numpy as np
import pytest
import torch

from avr import flow
from avr.backbone import Session, pack
from avr.backbone.packing import FlowSettings
from avr.defaults import tiny_model
from avr.sequence import Segment, Trajectory


def _session_run(
    model,
    cache,
    noise_level,
    cfg_scale,
    prompts=("a red circle", "two blue squares above a triangle"),
    temperature=1.0,
):
    session = Session(model, len(prompts), cache=cache)
    session.append_text(list(prompts))
    text = session.sample_text(
        6, temperature=temperature, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(0)
    )
    image = session.generate_image(
        steps=4,
        cfg_scale=cfg_scale,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(1),
    )
    after = session.sample_text(4, temperature=0.0)
    return text, image, after


@pytest.mark.parametrize(
    ("noise_level", "cfg_scale", "context", "rope"),
    [
        (0.0, 1.0, "both", "sequence"),
        (0.7, 3.0, "both", "sequence"),
        (0.0, 1.0, "latent", "sequence"),
        (0.0, 1.0, "vit", "sequence"),
        (0.7, 3.0, "both", "grid"),
    ],
    ids=["ode", "sde-cfg", "ode-latent-context", "ode-vit-context", "sde-cfg-grid-rope"],
)
def test_cached_generation_equals_full_recomputation(model, noise_level, cfg_scale, context, rope):
    if (context, rope) != (model.config.image_context, model.config.image_rope):
        config = dataclasses.replace(model.config, image_context=context, image_rope=rope)
        model = tiny_model(0, config).eval()
    cached = _session_run(model, True, noise_level, cfg_scale)
    full = _session_run(model, False, noise_level, cfg_scale)
    assert cached[0].ids == full[0].ids and cached[2].ids == full[2].ids
    torch.testing.assert_close(cached[0].logprobs, full[0].logprobs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached[1].latents, full[1].latents, rtol=1e-4, atol=1e-4)
    if noise_level:
        assert cached[1].logprobs.shape == (2, 4)
        torch.testing.assert_close(cached[1].logprobs, full[1].logprobs, rtol=1e-4, atol=1e-2)
    assert cached[1].nfe == (8 if cfg_scale != 1.0 else 4)


def test_sde_at_noise_zero_is_the_ode_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    times = flow.schedule(10, shift=3.0)
    for i in range(10):
        t, t_next = float(times[i]), float(times[i + 1])
        x_sde, logp = flow.sde_step(x, v, t, t_next, 0.0, float(times[1]), g)
        assert logp is None
        torch.testing.assert_close(x_sde, flow.ode_step(x, v, t, t_next))


def test_sde_log_prob_is_the_gaussian_density_of_the_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    times = flow.schedule(5)
    t, t_next, t_max = float(times[1]), float(times[2]), float(times[1])
    x_next, logp = flow.sde_step(x, v, t, t_next, 0.8, t_max, g)
    sigma = 0.8 * (t / (1 - t)) ** 0.5
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * (t_next - t)
    std = sigma * (t - t_next) ** 0.5
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(-1)
    torch.testing.assert_close(logp, expected)
    assert torch.isfinite(
        flow.sde_step(x, v, 1.0, t_next, 0.8, t_max, g)[1]
    ).all()  # t = 1 is guarded


def test_text_log_probs_are_the_policy_distribution(model):
    session = Session(model, 1)
    session.append_text(["a green triangle"])
    logits = session.last_logits.clone()
    greedy = session.sample_text(1, temperature=0.0)
    assert greedy.ids[0][0] == int(logits.argmax())
    assert greedy.logprobs[0][0] == pytest.approx(
        float(torch.log_softmax(logits, -1).max()), abs=1e-6
    )
    session = Session(model, 1)
    session.append_text(["a green triangle"])
    top1 = session.sample_text(
        3, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    session = Session(model, 1)
    session.append_text(["a green triangle"])
    assert top1.ids == session.sample_text(3, temperature=0.0).ids


def test_padding_rows_are_invisible(model):
    # Greedy text: sampled tokens would draw a batch's random numbers differently.
    alone = _session_run(model, True, 0.0, 1.0, ("a red circle",), temperature=0.0)
    batched = _session_run(
        model,
        True,
        0.0,
        1.0,
        ("a red circle", "a much longer prompt with many words"),
        temperature=0.0,
    )
    torch.testing.assert_close(
        alone[1].latents[:, 0], batched[1].latents[:, 0], rtol=1e-4, atol=1e-5
    )
    # pixels are 8-bit: float noise may move one value across a rounding boundary
    torch.testing.assert_close(alone[1].pixels[0], batched[1].pixels[0], rtol=0, atol=1.01 / 255)
    assert alone[2].ids[0] == batched[2].ids[0]


def test_stop_tokens_end_rows_and_the_image_is_read_back(model):
    session = Session(model, 2)
    session.append_text(["a", "b"])
    length = session.cache.length
    image = session.generate_image(steps=2, generator=torch.Generator().manual_seed(0))
    assert image.pixels.shape == (2, 3, 64, 64) and image.logprobs is None
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    g = model.geometry
    # <img>, the clean latent copy, the vision copy, </img>
    assert session.cache.length == length + 1 + g.gen_tokens + g.read_tokens + 1
    first = session.last_logits.argmax(-1).tolist()
    stop = model.tokenizer.convert_ids_to_tokens(first[0])
    out = session.sample_text(5, stop=[stop], temperature=0.0)
    assert out.ids[0] == [
        first[0]
    ]  # row 0 stops on its first token; row 1 goes on unless it also drew it
    row = out.ids[1]
    assert first[0] not in row[:-1] and (len(row) == 5 or row[-1] == first[0])
    with pytest.raises(ValueError, match="got 1 rows for a batch of 2"):
        session.append_tokens([[1]])


@pytest.mark.parametrize(
    ("context", "rope"),
    [("both", "sequence"), ("latent", "sequence"), ("vit", "sequence"), ("both", "grid")],
)
def test_a_read_image_gives_the_context_teacher_forcing_gives(model, trajectories, context, rope):
    """The next-token logits after an image the session read equal teacher forcing's on the same
    sequence: the session appends the clean copies the packer lays out (the path an image the
    session has just drawn takes too)."""
    config = dataclasses.replace(model.config, image_context=context, image_rope=rope)
    model = tiny_model(0, config).eval()
    image = trajectories[0].final_image
    session = Session(model, 1)
    session.append_tokens([[model.tokenizer.bos_token_id]])
    session.append_text(["edit this"])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    session.append_image(pixels[None])
    trajectory = Trajectory(
        [
            Segment.prompt("edit this"),
            Segment(image=image, role="input"),
            Segment(text="ok", loss=True),
        ]
    )
    batch = pack([trajectory], model.tokenizer, model.geometry, 512, [0], FlowSettings())
    with torch.no_grad():
        out = model(batch)
    # the first CE target is the text's first token, predicted at </img>
    torch.testing.assert_close(out.logits[0], session.last_logits[0], rtol=1e-4, atol=1e-4)
