"""`PolicyActor`: the unified model performing a mode's steps, for RL rollouts and evaluation.

Each rollout holds one `Session` (its KV cache): the prompt is read once, then every step samples
text or an image on top of everything before. Structure is scaffolded, content is sampled: the
control flow opens `<ins>` and `<img>` where the mode says a plan step or an image comes; the
model writes what is inside. A critique stops at `</refine>` or `<eos>`, or where the model itself
opens the next plan step or image (`<ins>`, `<img>`), which is then not opened twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from PIL import Image

from avr.backbone.generation import Session, TextSample
from avr.backbone.model import UnifiedModel
from avr.backbone.tokenizer import IMAGE_START, mode_token
from avr.data.critique import is_verdict_ok
from avr.protocol import Critique, Episode
from avr.sequence import ImageRole, Segment, image_to_array

_STEP = re.compile(r"step (\d+) of (\d+)")


@dataclass
class PolicyState:
    """What a `PolicyActor` keeps of one episode (`Episode.state`)."""

    session: Session
    """The episode's KV-cached context (a fresh one after `restart`)."""
    opened: str | None = None
    """`<ins>` or `<img>` where the model's last text opened the next part itself."""
    steps: int | None = None
    """How many steps the plan said it has ("step i of n"), once it said so."""
    nfe: int = 0
    """Velocity evaluations so far."""
    text_tokens: int = 0
    """Text tokens written so far."""


@dataclass
class SamplingConfig:
    """How a policy samples. `noise_level = 0` draws images with the ODE (evaluation); `> 0` with
    Flow-GRPO's SDE, keeping per-step log-probs (RL)."""

    max_text_tokens: int = 96
    """Longest text a single step may write."""
    temperature: float = 1.0
    """Text sampling temperature (0: greedy)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    steps: int = 25
    """Denoising steps per image."""
    cfg_scale: float = 1.0
    """Classifier-free guidance weight (1: none)."""
    noise_level: float = 0.0
    """SDE noise level `a` (0: ODE)."""
    shift: float = 1.0
    """Timestep schedule shift."""
    sde_window: tuple[int, int] | None = None
    """With `noise_level > 0`: only denoising steps `[first, last)` are stochastic, the others
    follow the ODE (MixGRPO's mixed ODE/SDE rollout: less variance outside the trained steps).
    None: every step is."""
    mode_temperature: float | None = None
    """Temperature of the adaptive mode choice alone (None: `temperature`). Above it, RL explores
    modes the policy is sure it does not want, so a group holds several modes and the complexity
    penalty has something to compare; the trainer weighs such samples by π/μ (μ: this behaviour
    distribution)."""

    def __post_init__(self) -> None:
        rules = {
            "max_text_tokens": (self.max_text_tokens >= 1, "≥ 1"),
            "temperature": (self.temperature >= 0, "≥ 0 (0: greedy)"),
            "top_k": (self.top_k >= 0, "≥ 0 (0: all tokens)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "steps": (self.steps >= 1, "≥ 1"),
            "cfg_scale": (self.cfg_scale >= 0, "≥ 0 (1: no guidance)"),
            "noise_level": (self.noise_level >= 0, "≥ 0 (0: ODE)"),
            "shift": (self.shift > 0, "> 0"),
            "sde_window": (
                self.sde_window is None
                or (len(self.sde_window) == 2 and 0 <= self.sde_window[0] < self.sde_window[1]),
                "[first, last) with 0 ≤ first < last, or null (every step)",
            ),
            "mode_temperature": (
                self.mode_temperature is None or self.mode_temperature > 0,
                "> 0 or null (the text temperature)",
            ),
        }
        for key, (ok, wanted) in rules.items():
            if not ok:
                raise ValueError(f"sampling.{key}: expected {wanted}, got {getattr(self, key)!r}")


class PolicyActor:
    """Runs a mode's steps with `model`; deterministic given `generator`'s seed. Callers roll out
    through `avr.rollout.rollout`, which gives each episode's actor one row of a batched session
    (`open_session`); by default the actor opens a session of its own. Its record of an episode
    is a `State` (`PolicyState`)."""

    State: type[PolicyState] = PolicyState

    def __init__(
        self,
        model: UnifiedModel,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        open_session: Callable[[], Session] | None = None,
    ) -> None:
        self.model, self.sampling = model, sampling or SamplingConfig()
        self.open_session = open_session or (lambda: model.session(batch_size=1))
        self.generator = generator or torch.Generator().manual_seed(0)
        tok = model.tokenizer
        self.stop_critique = ["</refine>", tok.eos_token, "<ins>", IMAGE_START]

    def begin(self, episode: Episode) -> None:
        episode.trajectory.segments.append(Segment.prompt(episode.spec.prompt))
        episode.state = self.State(session=self._read_prompt(episode))

    def restart(self, episode: Episode) -> None:
        """A fresh session holding the prompt alone; the compute so far keeps counting."""
        episode.trajectory.segments.append(Segment.restart(episode.spec.prompt))
        session = self._read_prompt(episode)
        episode.state.session, episode.state.opened, episode.state.steps = session, None, None

    def _read_prompt(self, episode: Episode) -> Session:
        """A new session that has read `<bos>` and the prompt."""
        session = self.open_session()
        session.append_tokens([[self.model.tokenizer.bos_token_id]])
        session.append_text([episode.spec.prompt])
        return session

    def choose(self, episode: Episode, modes: list[str]) -> str:
        """Sample a mode token, restricted to `modes`' tokens. Its log-prob is the full policy's
        (at the text temperature, as the trainer computes it); with a `mode_temperature`, the
        behaviour distribution's log-prob is kept too (`segment.behaviour_logprobs`)."""
        session: Session = episode.state.session
        tok = self.model.tokenizer
        ids = tok.convert_tokens_to_ids([mode_token(m) for m in modes])
        logits = session.last_logits[0]
        temperature = self.sampling.temperature or 1.0
        policy = torch.log_softmax(logits / temperature, -1)
        explore = self.sampling.mode_temperature
        behaviour = None
        if explore is not None:
            mu = torch.log_softmax(logits[ids].float() / explore, -1)
            pick = int(torch.multinomial(mu.exp().cpu(), 1, generator=self.generator))
            behaviour = [float(mu[pick])]
        elif self.sampling.temperature > 0:
            probs = torch.softmax(logits[ids] / temperature, -1)
            pick = int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
        else:
            pick = int(logits[ids].argmax())
        session.append_tokens([[ids[pick]]])
        token = mode_token(modes[pick])
        sample = TextSample([[ids[pick]]], [[float(policy[ids[pick]])]], [token], temperature)
        episode.add_text(mode_token(modes[pick]), sample, sample.logprobs[0])
        episode.trajectory.segments[-1].behaviour_logprobs = behaviour
        episode.state.text_tokens += 1
        return modes[pick]

    def announce(self, episode: Episode, mode: str) -> None:
        """Scaffold the forced mode's token, as the adaptive trajectories the model learned from
        begin (tokenized as the packer does: one special token where the vocabulary has it)."""
        token = mode_token(mode)
        episode.state.session.append_text([token])
        episode.add_text(token)  # scaffolding: forced, not sampled (no log-probs)

    def read(self, episode: Episode, image: Image.Image) -> None:
        """Read `image` as an input (an image the prompt comes with, not one the model draws): into
        the context and the trajectory, as an `INPUT` segment that is never trained."""
        self._append_image(episode, image)
        episode.trajectory.segments.append(Segment(image=image, role=ImageRole.INPUT, loss=False))

    def _append_image(self, episode: Episode, image: Image.Image) -> None:
        """Put `image`, drawn by someone else, into the episode's context (not its trajectory)."""
        pixels = torch.from_numpy(image_to_array(image, self.model.config.image_size))
        episode.state.session.append_image(rearrange(pixels, "h w c -> 1 c h w"))

    def plan(self, episode: Episode, step: int) -> bool:
        steps = episode.state.steps
        if steps is not None and step >= steps:
            return False
        if episode.state.opened != "<ins>":
            episode.state.session.append_text(["<ins>"])
            episode.add_text("<ins>")  # scaffolding: forced, not sampled (no log-probs)
        episode.state.opened = None
        sample = self._text(episode, stop=["</des>"])
        self._note_opening(episode, sample)
        text = sample.text[0]
        episode.add_text(text, sample, sample.logprobs[0])
        found = _STEP.search(text)
        episode.state.steps = int(found.group(2)) if found else step + 1
        return True

    def draft(self, episode: Episode, role: ImageRole) -> None:
        self._image(episode, role)

    def reflect(self, episode: Episode) -> Critique:
        sample = self._text(episode, stop=self.stop_critique)
        self._note_opening(episode, sample)
        text = sample.text[0]
        episode.add_text(text, sample, sample.logprobs[0])
        return Critique(text, is_verdict_ok(text))

    def refine(self, episode: Episode, role: ImageRole) -> None:
        self._image(episode, role)

    def _note_opening(self, episode: Episode, sample: TextSample) -> None:
        """Where the sampled text ended with `<ins>` or `<img>` (a stop, or the last token
        before `max_text_tokens`), the model opened the next part itself: it is not appended
        again (the packer lays such a rollout out the same way)."""
        ids = sample.ids[0]
        last = self.model.tokenizer.convert_ids_to_tokens(ids[-1:]) if ids else []
        episode.state.opened = last[0] if last and last[0] in ("<ins>", IMAGE_START) else None

    def _text(self, episode: Episode, stop: list[str]) -> TextSample:
        s = self.sampling
        sample = episode.state.session.sample_text(
            s.max_text_tokens,
            stop=stop,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            generator=self.generator,
        )
        episode.state.text_tokens += len(sample.ids[0])
        return sample

    def _image(self, episode: Episode, role: ImageRole) -> None:
        s = self.sampling
        session: Session = episode.state.session
        opened = episode.state.opened == IMAGE_START
        episode.state.opened = None
        sample = session.generate_image(
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            noise_level=s.noise_level,
            sde_window=None if s.sde_window is None else tuple(s.sde_window),
            shift=s.shift,
            generator=self.generator,
            start=not opened,
        )
        episode.state.nfe += sample.nfe
        pixels = rearrange(sample.pixels[0].float().cpu(), "c h w -> h w c")
        image = Image.fromarray((pixels.numpy() * 255).round().astype("uint8"), "RGB")
        logprobs = (  # None for the steps a mixed sampler drew with the ODE
            [None if v != v else v for v in sample.logprobs[0].tolist()]
            if sample.logprobs is not None
            else None
        )
        episode.add_image(image, role, sample, logprobs)

    def finish(self, episode: Episode) -> None:
        """Record the rollout's compute: velocity evaluations and text tokens written."""
        episode.trajectory.meta.update(nfe=episode.state.nfe, text_tokens=episode.state.text_tokens)
