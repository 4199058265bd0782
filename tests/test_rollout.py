"""The rollout engine: batched episodes equal one-at-a-time ones, whoever asks and whatever shares
the batch; sessions merge and split without changing a row; errors reach the caller."""

from __future__ import annotations

import pytest
import torch

from avr.defaults import tiny_model
from avr.policy import SamplingConfig
from avr.protocol import Actor, Episode, Mode
from avr.registry import MODES
from avr.rollout import Job, episode_seed, rollout, rollout_seed
from avr.sequence import ImageRole
from avr.world import sample_specs


class SketchTwiceMode(Mode):
    """A user's mode, from outside the package and not registered: draft, critique, then always
    redraw twice, whatever the critique says (its episodes are longer than direct's)."""

    name = "sketch-twice"

    def run(self, actor: Actor, episode: Episode) -> None:
        self.draft(actor, episode)
        actor.reflect(episode)
        for _ in range(2):
            actor.refine(episode, ImageRole.REFINED)

    def draft(self, actor: Actor, episode: Episode) -> None:
        actor.draft(episode, ImageRole.DRAFT)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0).eval()


def _modes() -> list[Mode]:
    return [MODES.get(name)() for name in MODES.names()] + [SketchTwiceMode()]


def _assert_same(one, other) -> None:
    for a, b in zip(one, other, strict=True):
        assert a.meta["mode"] == b.meta["mode"]
        assert [s.text for s in a.segments] == [s.text for s in b.segments]
        assert len(a.images) == len(b.images)
        for x, y in zip(a.segments, b.segments, strict=True):
            if x.logprobs is not None:
                torch.testing.assert_close(
                    torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=1e-4
                )
        for x, y in zip(a.images, b.images, strict=True):
            torch.testing.assert_close(x.sample.latents, y.sample.latents, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("noise_level", [0.0, 0.7], ids=["ode", "sde"])
def test_batched_rollouts_equal_one_at_a_time_for_every_mode(model, noise_level):
    sampling = SamplingConfig(steps=3, max_text_tokens=8, noise_level=noise_level)
    specs = sample_specs(3, seed=4)
    jobs = [
        Job(mode, spec, episode_seed(1, m, p))
        for m, mode in enumerate(_modes())
        for p, spec in enumerate(specs)
    ]
    batched = rollout(model, jobs, sampling, max_batch=len(jobs))
    single = rollout(model, jobs, sampling, max_batch=1)
    _assert_same(batched, single)
    # the episodes really branched: different lengths within one batch
    assert len({len(t.segments) for t in batched}) > 2
    if noise_level:
        assert all(s.logprobs is not None for t in batched for s in t.images)


def test_a_job_gives_the_same_trajectory_whatever_shares_its_batch(model):
    sampling = SamplingConfig(steps=3, max_text_tokens=8, noise_level=0.7)
    specs = sample_specs(4, seed=9)
    adaptive = MODES.get("adaptive")()
    mine = Job(adaptive, specs[0], 123)
    others = [
        Job(mode, spec, 7 + i) for i, (mode, spec) in enumerate(zip(_modes(), specs, strict=False))
    ]
    alone = rollout(model, [mine], sampling)
    among = rollout(model, [*others, mine], sampling)[-1:]
    first = rollout(model, [mine, *reversed(others)], sampling, max_batch=3)[:1]
    _assert_same(alone, among)
    _assert_same(alone, first)
    different = rollout(model, [Job(adaptive, specs[0], 124)], sampling)
    assert [s.text for s in different[0].segments] != [s.text for s in alone[0].segments] or (
        not torch.equal(different[0].images[0].sample.latents, alone[0].images[0].sample.latents)
    )


def test_merged_sessions_decode_as_each_alone_and_split_back_without_padding(model):
    tok = model.tokenizer
    prompts = ["a red circle", "three blue squares above a green triangle"]
    alone = []
    for prompt in prompts:
        session = model.session(batch_size=1)
        session.append_text([prompt])
        alone.append(session)
    merged = type(alone[0]).merge(alone)
    assert merged.batch_size == 2 and merged.cache.length == max(s.cache.length for s in alone)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    stops = [[tok.eos_token], ["</des>", tok.eos_token]]
    sample = merged.sample_text(6, stop=stops, generator=gens)
    rows = merged.split()
    for i, (session, row) in enumerate(zip(alone, rows, strict=True)):
        reference = session.sample_text(
            6, stop=stops[i], generator=[torch.Generator().manual_seed(5 + i)]
        )
        assert sample.ids[i] == reference.ids[0]
        torch.testing.assert_close(
            torch.tensor(sample.logprobs[i]), torch.tensor(reference.logprobs[0]), atol=1e-5, rtol=0
        )
        # the row's cache holds exactly its own positions, as the session that decoded alone
        assert row.cache.length == session.cache.length and bool(row.cache.valid.all())
        assert torch.equal(row.position, session.position)
        torch.testing.assert_close(row.cache.keys[0], session.cache.keys[0], atol=1e-5, rtol=0)


def test_a_failing_episode_raises_in_the_caller_and_does_not_hang(model):
    class Broken(Mode):
        name = "broken"

        def draft(self, actor: Actor, episode: Episode) -> None:
            actor.draft(episode, ImageRole.FINAL)
            raise RuntimeError("the plugin failed after drawing")

    spec = sample_specs(1, seed=1)[0]
    jobs = [Job(MODES.get("direct")(), spec, 1), Job(Broken(), spec, 2)]
    with pytest.raises(RuntimeError, match="the plugin failed after drawing"):
        rollout(model, jobs, SamplingConfig(steps=2, max_text_tokens=4))


def test_bad_batch_size_is_an_error(model):
    with pytest.raises(ValueError, match="max_batch must be ≥ 1"):
        rollout(model, [], max_batch=0)


def test_decoding_goes_on_with_the_rows_still_writing_and_gives_what_each_row_gives_alone(
    model, monkeypatch
):
    """Once at most half the rows write, the session decodes those rows alone (`_take`/`_put`):
    every row's tokens, log-probs, cache and next logits are still what it gets decoding alone."""
    tok = model.tokenizer
    prompts = ["a red circle", "two green squares", "a blue triangle", "three purple circles"]
    everything = list(tok.get_vocab())  # rows 0-2 stop after their first token, row 3 writes on
    stops = [everything] * 3 + [[tok.eos_token]]

    def fresh(prompt_list):
        session = model.session(batch_size=len(prompt_list))
        session.append_text(prompt_list)
        return session

    batched = fresh(prompts)
    taken = []
    take = type(batched)._take
    monkeypatch.setattr(
        type(batched), "_take", lambda self, rows: taken.append(rows) or take(self, rows)
    )
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    sample = batched.sample_text(8, stop=stops, generator=gens)
    assert taken == [[3]]  # after the first token, row 3 decodes alone
    assert [len(ids) for ids in sample.ids[:3]] == [1, 1, 1] and len(sample.ids[3]) > 2
    for i, (prompt, row) in enumerate(zip(prompts, batched.split(), strict=True)):
        alone = fresh([prompt])
        reference = alone.sample_text(
            8, stop=stops[i], generator=[torch.Generator().manual_seed(10 + i)]
        )
        assert sample.ids[i] == reference.ids[0]
        torch.testing.assert_close(
            torch.tensor(sample.logprobs[i]), torch.tensor(reference.logprobs[0]), atol=1e-5, rtol=0
        )
        assert row.cache.length == alone.cache.length and torch.equal(row.position, alone.position)
        torch.testing.assert_close(row.cache.keys[-1], alone.cache.keys[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(row.last_logits, alone.last_logits, atol=1e-4, rtol=0)


def test_one_seeding_rule_for_every_caller():
    """Prompt i's first sample is `seed + i` (evaluation, the callbacks' grids, `generate`); a
    further sample and a keyed stream (RL's step or prompt digest) are well mixed and distinct."""
    from avr.lit.rl_settings import Seeding

    assert [rollout_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert rollout_seed(5, 3, 1) == episode_seed(5, 3, 1)
    firsts = {rollout_seed(0, i, 0, stream=s) for i in range(4) for s in range(4)}
    assert len(firsts) == 16  # (step, prompt) pairs never share a draw
    shared = [Seeding(shared_noise=True).seeds(0, 2, 1, g) for g in range(3)]
    assert len({seed for seed, _ in shared}) == 3 and len({noise for _, noise in shared}) == 1
    assert Seeding().seeds(0, 2, 1, 0) == (episode_seed(0, 2, 1, 0), None)
