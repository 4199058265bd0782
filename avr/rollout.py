"""The rollout engine: every caller that samples trajectories from a model (RL, `avr.evaluate`,
the trajectory-grid callback, capability-aware labels, `avr.bench`) goes through `rollout`.

**Seeding rule.** A job is `(mode, spec, seed)`; its episode draws every random number (mode token,
text tokens, image noise, SDE noise) from its own `torch.Generator` seeded with `seed` (the images'
starting noise from a second one where the job names a `noise_seed`). So the
trajectory is a function of the job, the sampling settings and the weights alone, not of the
caller, of the batch size or of which other episodes share the batch. Every caller picks `seed`
by one rule, `rollout_seed(seed, prompt, sample, stream)`: sample 0 of prompt `i` is `seed + i`.

**How episodes are batched: threads and a scheduler.** A mode's control flow is plain,
synchronous, per-episode Python (`Mode.run(actor, episode)`), and users' plugins must stay that
way, so each episode runs in its own thread with its own `PolicyActor`. The actor's session is a
`_Row`: a proxy for the episode's own one-row `Session` (its KV cache). Each call on it (append
text, sample text, draw an image) is posted to the scheduler and blocks. When every live episode
is blocked on a call (or done), the scheduler runs the calls of one kind (and one set of
arguments) together: it merges the asking episodes' sessions into one batch (`Session.merge`:
caches padded with positions nothing attends to), makes one batched, KV-cached call with per-row
stops (a critique that ends early pads while the others write), splits the batch back into
one-row sessions without the padding (`Session.split`), and wakes the episodes. Episodes that are
not asking cost nothing, and no episode's cache grows by another's padding. Threads, rather than
generators or `async`, because they are the only way to suspend a plugin's unmodified, plain
function in the middle of a call; the backbone runs on the scheduler's thread only, so the
episode threads never compute concurrently with it and the result does not depend on thread
timing. Episodes branch freely: a reflect that is right stops, a plan takes more steps; the batch
shrinks as episodes end.

Backbones whose sessions hold one sequence (`session_rows = 1`, Janus) run through the same
engine one episode at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from avr.backbone.generation import ImageSample, Session
from avr.policy import PolicyActor, SamplingConfig
from avr.protocol import Actor, Mode
from avr.sequence import Trajectory
from avr.world.spec import PromptSpec


@dataclass(frozen=True)
class Job:
    """One episode to roll out: `mode` on `spec`, every random draw from `seed` (the images'
    starting noise from `noise_seed` where given)."""

    mode: Mode
    spec: PromptSpec
    seed: int
    noise_seed: int | None = None
    """Where given, each image's starting noise comes from its own stream seeded with it, so jobs
    that share it start their k-th image from the same noise (a group sharing its initial noise,
    as MixGRPO's rollouts may); the rest still comes from `seed`."""


def episode_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (base seed, step, prompt, sample …), well mixed, so nearby
    keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


#: The `sample` index of a group's shared starting noise (RL's `shared_noise`): far above any
#: group's size, so it never meets a rollout's own seed.
SHARED_NOISE = 2**21
#: The stream RL draws an update's choice of replayed SDE and anchor steps from.
REPLAY_STREAM = 2**20


def rollout_seed(seed: int, prompt: int, sample: int = 0, stream: int | None = None) -> int:
    """The seeding rule of every caller (RL, `avr.evaluate`, the callbacks, capability-aware
    labels, `avr data build`, `avr.bench`): the seed of sample `sample` of prompt `prompt`.

    Without a `stream`, sample 0 of prompt `i` is `seed + i` (an evaluation, a callback's grid
    and a label's first rollout of a prompt agree, and `generate --seed s` on one prompt is the
    same draw) and a further sample is `episode_seed(seed, prompt, sample)`. A `stream` keys a
    family of draws apart (RL: the training step, or a digest of the prompt's text):
    `episode_seed(seed, stream, prompt, sample)`."""
    if stream is not None:
        return episode_seed(seed, stream, prompt, sample)
    return seed + prompt if sample == 0 else episode_seed(seed, prompt, sample)


def replay_rng(seed: int, step: int) -> np.random.Generator:
    """The generator an RL update draws its replayed steps from (the same at a resumed step)."""
    return np.random.default_rng([seed, step, REPLAY_STREAM])


#: Builds the actor of one episode: `(job, sampling, generator, open_session) -> Actor`. The default
#: is the policy itself (`PolicyActor`); `avr.data.self_sample` passes one in which the model draws
#: and a teacher writes the text.
ActorFactory = Callable[[Job, SamplingConfig, torch.Generator, Callable[[], Any]], Actor]


def rollout(
    model,
    jobs: Sequence[Job],
    sampling: SamplingConfig | None = None,
    max_batch: int = 32,
    seconds: dict[str, float] | None = None,
    actor: ActorFactory | None = None,
) -> list[Trajectory]:
    """Roll out `jobs` with `model` (no gradients), `max_batch` episodes at a time; returns their
    trajectories in order. `max_batch = 1` runs them one at a time (the reference that batched
    runs equal up to float rounding). `seconds`, when given, accumulates the backbone's time per
    kind of call (`append_tokens`, `sample_text`, `generate_image`, `append_image`). `actor`
    builds each episode's actor (default: the policy, `PolicyActor`)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
    sampling = sampling or SamplingConfig()
    max_batch = min(max_batch, getattr(model, "session_rows", max_batch) or max_batch)
    if actor is None:

        def actor(job, sampling, generator, open_session):
            return PolicyActor(model, sampling, generator, open_session=open_session)

    out: list[Trajectory] = []
    with torch.no_grad():
        for start in range(0, len(jobs), max_batch):
            batch = _Batch(model, jobs[start : start + max_batch], sampling, actor)
            out.extend(batch.run())
            for kind, spent in batch.seconds.items():
                if seconds is not None:
                    seconds[kind] = seconds.get(kind, 0.0) + spent
    return out


# ---- the scheduler --------------------------------------------------------------------------


@dataclass
class _Call:
    """A call an episode waits on: `kind` is a `Session` method, `kwargs` its arguments for one
    row; the scheduler fills `result` (or `error`) and sets `done`."""

    row: int
    kind: str
    kwargs: dict[str, Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Batch:
    model: Any
    jobs: Sequence[Job]
    sampling: SamplingConfig
    actor: ActorFactory
    waiting: dict[int, _Call] = field(default_factory=dict)
    live: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Condition()
        self.sessions: list[Session] = [self.model.session(batch_size=1) for _ in self.jobs]
        self.generators = [torch.Generator().manual_seed(int(job.seed)) for job in self.jobs]
        self.noise_generators = [
            g if job.noise_seed is None else torch.Generator().manual_seed(int(job.noise_seed))
            for g, job in zip(self.generators, self.jobs, strict=True)
        ]
        self.results: list[Trajectory | None] = [None] * len(self.jobs)
        self.errors: list[BaseException | None] = [None] * len(self.jobs)
        self.aborted: BaseException | None = None
        self.seconds: dict[str, float] = {}

    # -- the episodes' side

    def open(self, row: int) -> _Row:
        """A fresh one-row session for `row` (its episode begins, or restarts for another try).
        Called from the episode's thread while the scheduler waits for it, so no batched call is
        using the row's session."""
        with self.lock:
            self.sessions[row] = self.model.session(batch_size=1)
        return _Row(self, row)

    def call(self, row: int, kind: str, **kwargs) -> Any:
        """Post a call for `row` and block until the scheduler has run it."""
        call = _Call(row, kind, kwargs)
        with self.lock:
            if self.aborted is not None:
                raise RuntimeError("rollout aborted") from self.aborted
            self.waiting[row] = call
            self.lock.notify_all()
            while not call.done:
                self.lock.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _episode(self, row: int) -> None:
        job = self.jobs[row]
        actor = self.actor(job, self.sampling, self.generators[row], lambda: self.open(row))
        try:
            self.results[row] = job.mode.rollout(actor, job.spec)
        except BaseException as error:  # re-raised on the caller's thread
            self.errors[row] = error
        finally:
            with self.lock:
                self.live -= 1
                self.lock.notify_all()

    # -- the scheduler's side

    def run(self) -> list[Trajectory]:
        self.live = len(self.jobs)
        threads = [
            threading.Thread(target=self._episode, args=(row,), daemon=True)
            for row in range(len(self.jobs))
        ]
        for thread in threads:
            thread.start()
        with self.lock:
            while True:
                while self.live and len(self.waiting) < self.live:
                    self.lock.wait()
                if not self.live:
                    break
                calls, self.waiting = sorted(self.waiting.values(), key=lambda c: c.row), {}
                try:
                    self._execute(calls)
                except BaseException as error:
                    self.aborted = error
                    for call in calls:
                        call.error = RuntimeError("rollout aborted")
                        call.error.__cause__ = error
                for call in calls:
                    call.done = True
                self.lock.notify_all()
        for thread in threads:
            thread.join()
        if self.aborted is not None:
            raise self.aborted
        for error in self.errors:
            if error is not None:
                raise error
        return [t for t in self.results if t is not None]

    def _execute(self, calls: list[_Call]) -> None:
        """Run the waiting calls, each kind (and each set of arguments) as one batched call."""
        groups: dict[tuple, list[_Call]] = {}
        for call in calls:
            if call.kind in ("append_tokens", "append_image"):  # one batched call each
                key: tuple = (call.kind,)
            elif call.kind == "generate_image":  # `<img>` openings are appended first, below
                key = ("generate_image", *sorted(_no(call.kwargs, "start").items()))
            elif call.kind == "sample_text":  # each row stops at its own stop tokens
                key = ("sample_text", *sorted(_no(call.kwargs, "stop").items()))
            else:
                key = (call.kind, *((k, _hashable(v)) for k, v in sorted(call.kwargs.items())))
            groups.setdefault(key, []).append(call)
        for key, group in groups.items():
            start = time.perf_counter()
            getattr(self, f"_{key[0]}")(group)
            self.seconds[key[0]] = self.seconds.get(key[0], 0.0) + time.perf_counter() - start

    def _merged(self, group: list[_Call]) -> Session:
        return type(self.sessions[0]).merge([self.sessions[c.row] for c in group])

    def _split(self, group: list[_Call], merged: Session) -> None:
        for call, session in zip(group, merged.split(), strict=True):
            self.sessions[call.row] = session

    def _generators(self, group: list[_Call]) -> list[torch.Generator | None]:
        return [self.generators[c.row] for c in group]

    def _append_tokens(self, group: list[_Call]) -> None:
        merged = self._merged(group)
        merged.append_tokens([list(c.kwargs["ids"]) for c in group])
        self._split(group, merged)

    def _append_image(self, group: list[_Call]) -> None:
        merged = self._merged(group)
        merged.append_image(torch.cat([c.kwargs["pixels"] for c in group]))
        self._split(group, merged)

    def _sample_text(self, group: list[_Call]) -> None:
        merged = self._merged(group)
        stops = [list(c.kwargs["stop"] or [self.model.tokenizer.eos_token]) for c in group]
        sample = merged.sample_text(
            **_no(group[0].kwargs, "stop"), stop=stops, generator=self._generators(group)
        )
        self._split(group, merged)
        for b, call in enumerate(group):
            call.result = replace(
                sample, ids=[sample.ids[b]], logprobs=[sample.logprobs[b]], text=[sample.text[b]]
            )

    def _generate_image(self, group: list[_Call]) -> None:
        merged = self._merged(group)
        opening = [bool(c.kwargs.get("start", True)) for c in group]
        if any(opening):
            merged.append_tokens([[merged.image_start] if o else [] for o in opening])
        sample = merged.generate_image(
            **_no(group[0].kwargs, "start"),
            generator=self._generators(group),
            noise_generator=[self.noise_generators[c.row] for c in group],
            start=False,
        )
        self._split(group, merged)
        if len(group) == 1:  # as the session returned it (a token backbone's sample included)
            group[0].result = sample
            return
        for b, call in enumerate(group):
            call.result = replace(  # one row; the sampler's settings carried as they are
                sample,
                pixels=sample.pixels[b : b + 1],
                latents=sample.latents[:, b : b + 1],
                logprobs=None if sample.logprobs is None else sample.logprobs[b : b + 1],
            )


class _Row:
    """What an episode's actor sees as its session: one row of the batch's shared `Session`."""

    def __init__(self, batch: _Batch, row: int) -> None:
        self.batch, self.row = batch, row

    @property
    def last_logits(self) -> torch.Tensor | None:
        return self.batch.sessions[self.row].last_logits

    def append_tokens(self, ids: list[list[int]]) -> None:
        (row,) = ids
        self.batch.call(self.row, "append_tokens", ids=tuple(row))

    def append_text(self, texts: list[str]) -> None:
        (text,) = texts
        tok = self.batch.model.tokenizer
        self.append_tokens([tok.encode(text, add_special_tokens=False)])

    def sample_text(self, max_new_tokens: int, stop: list[str] | None = None, **kwargs):
        kwargs.pop("generator", None)  # the row's own generator is used
        return self.batch.call(
            self.row, "sample_text", max_new_tokens=max_new_tokens, stop=stop, **kwargs
        )

    def append_image(self, pixels: torch.Tensor) -> None:
        (_,) = pixels  # one row
        self.batch.call(self.row, "append_image", pixels=pixels)

    def generate_image(self, **kwargs) -> ImageSample:
        kwargs.pop("generator", None)  # the row's own generators are used
        kwargs.pop("noise_generator", None)
        return self.batch.call(self.row, "generate_image", **kwargs)


def _no(kwargs: dict, key: str) -> dict:
    return {k: v for k, v in kwargs.items() if k != key}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
