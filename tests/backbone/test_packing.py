import dataclasses

import pytest
import torch

from avr.backbone import FlowSettings, UnifiedLoss, pack
from avr.backbone.attention import TrajectoryAttention
from avr.backbone.packing import GEN, LATENT, READ, TEXT
from avr.backbone.tokenizer import IMAGE_END, IMAGE_START
from avr.defaults import tiny_model
from avr.sequence import Segment, Trajectory

FLOW = FlowSettings(cfg_dropout=0.5)


def _pack(model, trajs, seeds, max_len=2048):
    return pack(trajs, model.tokenizer, model.geometry, max_len, seeds, FLOW)


@pytest.mark.parametrize(
    ("expert", "context", "rope"),
    [
        (False, "both", "sequence"),
        (True, "both", "sequence"),
        (False, "vit", "sequence"),
        (True, "latent", "sequence"),
        (False, "both", "grid"),
    ],
    ids=["dense", "generation-expert", "vit-context", "latent-context-expert", "grid-rope"],
)
def test_packed_loss_equals_per_sample_losses(trajectories, expert, context, rope):
    config = dataclasses.replace(
        tiny_model(0).config, generation_expert=expert, image_context=context, image_rope=rope
    )
    model = tiny_model(0, config).eval()
    seeds = [11, 12, 13, 14]
    batch = _pack(model, trajectories, seeds)
    assert batch.input_ids.shape[0] == 1  # all four share one row
    with torch.no_grad():
        packed = UnifiedLoss().per_sample(model(batch))
        loss, stats = UnifiedLoss(model.config.ce_weight)(model(batch))
    sums = [0.0, 0, 0.0, 0]
    for i, (traj, seed) in enumerate(zip(trajectories, seeds, strict=True)):
        with torch.no_grad():
            alone = UnifiedLoss().per_sample(model(_pack(model, [traj], [seed])))[0]
        assert alone[1] == packed[i][1] and alone[3] == packed[i][3]
        assert alone[0] == pytest.approx(packed[i][0], rel=1e-5, abs=1e-5)
        assert alone[2] == pytest.approx(packed[i][2], rel=1e-5, abs=1e-5)
        sums = [a + b for a, b in zip(sums, alone, strict=True)]
    expected = model.config.ce_weight * sums[0] / sums[1] + sums[2] / sums[3]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["tokens/text"].item() == sums[1]


def test_a_noisy_copy_is_invisible_to_later_tokens(model, trajectories):
    reflect = trajectories[1]  # draft (noisy + clean copies) → critique → refined → text
    batch = _pack(model, [reflect], [3])
    with torch.no_grad():
        before = model(batch)
        batch.gen_noise[0] += 1.0  # the draft's noisy copy only
        after = model(batch)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.velocity[1], after.velocity[1])  # the refined image
    assert not torch.allclose(before.velocity[0], after.velocity[0])  # the draft itself changes


def test_several_noisy_states_of_one_image_replay_each_step_after_one_context(model, trajectories):
    reflect = trajectories[1]  # two generated images: the draft and the refined one
    n, d = model.geometry.gen_tokens, model.geometry.token_dim
    g = torch.Generator().manual_seed(0)
    draft = [(torch.randn(n, d, generator=g), t) for t in (0.9, 0.5, 0.2)]
    refined = [(torch.randn(n, d, generator=g), 0.7)]

    def replay(states):
        batch = pack(
            [reflect], model.tokenizer, model.geometry, 2048, [0], rl=True, states=[states]
        )
        with torch.no_grad():
            return batch, model(batch)

    batch, out = replay([draft, refined])
    assert batch.gen_t.tolist() == pytest.approx([0.9, 0.5, 0.2, 0.7])
    assert batch.gen_sample.tolist() == [0, 0, 0, 0]
    assert int((batch.token_type == GEN).sum()) == 4 * n  # one noisy block per state
    for k, state in enumerate(draft):  # each block as if replayed alone: the blocks do not mix
        _, alone = replay([[state], refined])
        torch.testing.assert_close(out.velocity[k], alone.velocity[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, alone.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.velocity[3], alone.velocity[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"trajectory 0: states for 1 images .* for 2 generated"):
        replay([draft])
    with pytest.raises(ValueError, match=r"each needs ≥ 1"):
        replay([draft, []])


def test_samples_in_one_row_do_not_see_each_other(model, trajectories):
    a, b = trajectories[0], trajectories[1]
    batch = _pack(model, [a, b], [1, 2])
    assert batch.input_ids.shape[0] == 1
    with torch.no_grad():
        before = model(batch)
        a_tokens = (batch.sample == 0) & (batch.token_type == TEXT)
        batch.input_ids[a_tokens] = 5
        batch.gen_pixels[batch.gen_sample == 0] = 1 - batch.gen_pixels[batch.gen_sample == 0]
        after = model(batch)
    in_b = before.label_sample == 1
    assert torch.equal(before.logits[in_b], after.logits[in_b])
    assert torch.equal(
        before.velocity[before.image_sample == 1], after.velocity[after.image_sample == 1]
    )
    assert not torch.equal(before.logits[~in_b], after.logits[~in_b])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_dense_mask(trajectories):
    model = tiny_model(0).eval()
    batch = _pack(model, trajectories, [1, 2, 3, 4], max_len=400)
    assert batch.input_ids.shape[0] > 1  # several rows, with padding
    with torch.no_grad():
        model.config.attention = "sdpa"
        dense = model(batch)
        model.config.attention = "flex"
        flex = model(batch)
    torch.testing.assert_close(flex.logits, dense.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flex.velocity, dense.velocity, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("expert", [False, True], ids=["dense", "generation-expert"])
def test_trajectory_attention_matches_dense_mask(trajectories, expert):
    """Attention one trajectory at a time (the CPU default) gives the dense mask's loss and
    gradients: rows with padding, trajectories of different lengths in one group, CFG-dropped
    images."""
    config = dataclasses.replace(tiny_model(0).config, generation_expert=expert)
    model = tiny_model(0, config)
    batch = _pack(model, trajectories * 2, list(range(8)), max_len=400)
    assert batch.input_ids.shape[0] > 1 and bool((batch.sample < 0).any())
    assert bool(batch.uncond.any())
    results = {}
    for kernel in ("sdpa", "trajectory"):
        model.config.attention = kernel
        model.zero_grad()
        out = model(batch)
        loss, _ = UnifiedLoss(model.config.ce_weight)(out)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = (out, loss, grads)
    (dense, dense_loss, dense_grads), (ours, loss, grads) = results["sdpa"], results["trajectory"]
    torch.testing.assert_close(ours.logits, dense.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.velocity, dense.velocity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == dense_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_attends_per_trajectory_on_cpu_and_with_flex_on_cuda():
    model = tiny_model(0)
    assert model.config.attention == "auto"
    assert model.attention_kernel(torch.device("cpu")) == "trajectory"
    assert model.attention_kernel(torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="config key 'attention': expected 'auto', 'flex', "):
        dataclasses.replace(model.config, attention="dense")


def test_trajectory_attention_groups_by_length(model, trajectories):
    """Every trajectory token is in exactly one group; a group spans lengths within `spread`."""
    batch = _pack(model, trajectories * 3, list(range(12)), max_len=600)
    attention = TrajectoryAttention.of(batch, spread=0.8)
    tokens = int((batch.sample >= 0).sum())
    assert (
        sorted(attention.scatter.tolist())
        == torch.nonzero(batch.sample.reshape(-1) >= 0).flatten().tolist()
    )
    assert len(attention.scatter) == tokens
    for group in attention.groups:
        lengths = group.valid.sum(1)
        assert int(lengths.min()) >= 0.8 * group.valid.shape[1]
        assert int(lengths.max()) == group.valid.shape[1]
    with pytest.raises(ValueError, match="spread"):
        TrajectoryAttention.of(batch, spread=0)


def test_layout_of_one_trajectory(model, trajectories):
    tok = model.tokenizer
    batch = _pack(model, [trajectories[1]], [0])
    ids, kind, pos, labels = (
        t[0].tolist() for t in (batch.input_ids, batch.token_type, batch.position, batch.labels)
    )
    start, end = tok.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    g, r = model.geometry.gen_tokens, model.geometry.read_tokens
    assert model.config.image_context == "both"
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    first = ids.index(start)
    assert labels[first - 1] == start  # the model learns to open an image
    assert kind[first + 1 : first + 1 + g] == [GEN] * g  # noisy copy
    assert kind[first + 1 + g : first + 1 + 2 * g] == [LATENT] * g  # clean latent copy
    assert kind[first + 1 + 2 * g : first + 1 + 2 * g + r] == [READ] * r  # vision copy
    n = 2 * g + r
    assert ids[first + 1 + n] == end and labels[first + n] == end
    assert set(pos[first + 1 : first + 1 + n]) == {pos[first] + 1}  # an image is one position
    assert pos[first + 1 + n] == pos[first] + 2
    blocks = batch.block[0, first + 1 : first + 1 + n].tolist()
    assert len(set(blocks)) == 3  # three copies, each its own bidirectional block
    assert len(batch.clean_pixels) == len(batch.read_pixels) == 2  # both images are followed
    prompt_len = first - 1
    assert all(
        label == -100 for label in labels[: prompt_len - 1]
    )  # the prompt is read, not learned
    assert sum(k == GEN for k in kind) == 2 * g  # draft and refined: two noisy copies


def test_an_image_without_loss_is_read_not_learned(model, trajectories):
    """A draft the verifier rejected (`loss=False`) is context for its critique: laid out as an
    input image (clean copies, no noisy copy, no flow target, `<img>` not learned), everything
    after it unchanged."""
    trained = trajectories[1]
    read = dataclasses.replace(trained, segments=[dataclasses.replace(s) for s in trained.segments])
    draft = next(k for k, s in enumerate(read.segments) if s.is_image)
    read.segments[draft].loss = False
    a, b = _pack(model, [trained], [0]), _pack(model, [read], [0])
    g = model.geometry.gen_tokens
    kinds = [t[0].tolist() for t in (a.token_type, b.token_type)]
    assert sum(k == GEN for k in kinds[0]) == 2 * g and sum(k == GEN for k in kinds[1]) == g
    assert len(a.gen_pixels) == 2 and len(b.gen_pixels) == 1
    assert torch.equal(b.gen_pixels[0], a.gen_pixels[1])  # the refined image is still learned
    assert len(b.clean_pixels) == len(a.clean_pixels) and len(b.read_pixels) == len(a.read_pixels)
    start, end = model.tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    first = b.input_ids[0].tolist().index(start)
    assert b.labels[0, first - 1] == -100  # not taught to open or close the rejected draft
    later = [label for label in b.labels[0, first + 1 :].tolist() if label != -100]
    assert [end, *later] == [label for label in a.labels[0, first + 1 :].tolist() if label != -100]


def test_bad_input_is_refused(model, trajectories):
    with pytest.raises(
        ValueError, match=r"trajectory 0 takes \d+ tokens, over the maximum length 50"
    ):
        _pack(model, trajectories[:1], [0], max_len=50)
    small = Trajectory(
        [
            Segment.prompt("a circle"),
            Segment(image=trajectories[0].final_image.resize((32, 32)), role="final"),
        ]
    )
    with pytest.raises(ValueError, match="expected a 64×64 image, got 32×32"):
        _pack(model, [small], [0])
    grey = Trajectory(
        [Segment.prompt("a"), Segment(image=trajectories[0].final_image.convert("L"), role="final")]
    )
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        _pack(model, [grey], [0])
    with pytest.raises(ValueError, match="exactly one of text or image"):
        Segment()
    with pytest.raises(ValueError, match="'sketchy' is not a valid ImageRole"):
        Segment(image=trajectories[0].final_image, role="sketchy")
    batch = _pack(model, trajectories, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="exceeds max_seq_len 100"):
        model.config.max_seq_len, saved = 100, model.config.max_seq_len
        try:
            model(batch)
        finally:
            model.config.max_seq_len = saved


@pytest.mark.parametrize("context", ["latent", "vit"])
def test_later_tokens_read_the_clean_copy_the_context_names(model, trajectories, context):
    """What follows a drafted image changes with the pixels of exactly the copy it can read."""
    config = dataclasses.replace(model.config, image_context=context)
    tiny = tiny_model(0, config).eval()
    batch = _pack(tiny, [trajectories[1]], [3])
    with torch.no_grad():
        before = tiny(batch)
        if context == "latent":
            batch.clean_pixels = 1 - batch.clean_pixels
        else:
            batch.read_pixels = 1 - batch.read_pixels
        after = tiny(batch)
    assert not torch.allclose(before.logits, after.logits)  # the critique reads it
    assert not torch.allclose(before.velocity[1], after.velocity[1])  # so does the refined image
    torch.testing.assert_close(before.velocity[0], after.velocity[0])  # the draft cannot


def test_image_context_is_validated():
    with pytest.raises(ValueError, match="config key 'image_context': expected 'vit', 'latent'"):
        dataclasses.replace(tiny_model(0).config, image_context="pixels")


def test_grid_rope_is_1d_rope_for_text_and_puts_the_same_cell_of_two_images_on_one_place(
    trajectories,
):
    """`image_rope: grid`: text-only input runs exactly as with 1-D RoPE; image-copy tokens get
    (sequence, row, column) positions, a reader copy's cells scaled onto the latent grid; the
    draft's clean copy and the refined image's noisy copy share row and column cell by cell."""
    sequence = tiny_model(0).eval()
    grid = tiny_model(0, dataclasses.replace(sequence.config, image_rope="grid")).eval()
    text = Trajectory([Segment.prompt("a red circle"), Segment(text="the image matches")])
    with torch.no_grad():
        a = sequence(_pack(sequence, [text], [0]))
        b = grid(_pack(grid, [text], [0]))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    batch = _pack(grid, [trajectories[1]], [0])  # draft → critique → refined
    position = grid.rope_positions(batch.position, batch.grid)[:, 0]  # [3, L]
    kind = batch.token_type[0]
    side = int(grid.geometry.gen_tokens**0.5)
    cells = torch.stack(
        [torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)]
    )
    clean = position[:, kind == LATENT][:, : grid.geometry.gen_tokens]  # the draft's
    noisy = position[:, kind == GEN][:, grid.geometry.gen_tokens :]  # the refined image's
    assert torch.equal(clean[1:], cells) and torch.equal(noisy[1:], cells)
    assert (noisy[0] > clean[0]).all()  # the sequence axis still orders the images
    read = position[1:, kind == READ]
    assert read.max() < side and read.unique().numel() == int(grid.geometry.read_tokens**0.5)
    on_text = position[:, kind == TEXT]
    assert torch.equal(on_text[0], on_text[1]) and torch.equal(on_text[0], on_text[2])
    with torch.no_grad():
        assert not torch.allclose(sequence(batch).velocity, grid(batch).velocity)


def test_the_packing_bench_runs_with_its_defaults(capsys):
    """`python -m avr.bench packing` as a user first runs it: its plan-shaped trajectories take
    more than 512 tokens, so the default row is the shortest power-of-two multiple of 512 that
    holds them (it used to stop on "over the maximum length 512")."""
    from avr.bench import main as bench

    assert bench(["packing", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "rows of 1024 tokens" in out and "packed vs padded" in out
