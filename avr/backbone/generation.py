"""Generation over a growing interleaved context: `Session`.

A session holds a batch of sequences in lockstep. Text is decoded incrementally (temperature,
top-k, top-p; per-token log-probs); an image is denoised over the cached prefix: each step runs only
the image's own tokens against the cached keys/values of everything before (`cache=True`), or, as
the reference the benchmark compares against, recomputes the whole sequence (`cache=False`).

Rows that have stopped (their text hit a stop token) append padding that nothing attends to, so a
batch can hold sequences of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from avr import flow
from avr.backbone.records import KVCache
from avr.backbone.tokenizer import IMAGE_END, IMAGE_START

if TYPE_CHECKING:
    from avr.backbone.model import UnifiedModel


@dataclass
class TextSample:
    """Decoded text per row: token ids (stop token included), their log-probs, and the string;
    `temperature`: what the log-probs were taken at (1 for greedy text), so a replay computes the
    distribution that was sampled."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    text: list[str]
    temperature: float = 1.0


@dataclass
class ImageSample:
    """A generated image per row, with its denoising path (RL recomputes log-probs on it)."""

    pixels: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [S + 1, B, N, D_tok]: x at every time of the schedule
    timesteps: torch.Tensor  # [S + 1], from 1 to 0
    logprobs: torch.Tensor | None  # [B, S] per SDE step; None for the ODE sampler
    nfe: int  # velocity evaluations (a CFG step counts two)
    noise_level: float = 0.0  # the SDE's noise level (0: the ODE)
    cfg_scale: float = 1.0  # classifier-free guidance of the sampled velocity


@dataclass(frozen=True)
class SamplerSettings:
    """What a batch of rollouts was sampled with, as its samples recorded it."""

    temperature: float = 1.0
    noise_level: float = 0.0
    cfg_scale: float = 1.0


def sampler_settings(trajectories) -> SamplerSettings:
    """The sampler settings of `trajectories`, read from their samples (`TextSample.temperature`;
    `ImageSample.noise_level` and `cfg_scale` of the images with log-probs), so RL's replay
    computes the distributions that were sampled. One setting per batch: rollouts sampled with
    different ones are an error (replay each setting's rollouts apart)."""
    seen: dict[str, set[float]] = {"temperature": set(), "noise_level": set(), "cfg_scale": set()}
    for trajectory in trajectories:
        for segment in trajectory.segments:
            sample = segment.sample
            if isinstance(sample, TextSample):
                seen["temperature"].add(sample.temperature)
            elif isinstance(sample, ImageSample) and sample.logprobs is not None:
                seen["noise_level"].add(sample.noise_level)
                seen["cfg_scale"].add(sample.cfg_scale)
    for name, values in seen.items():
        if len(values) > 1:
            raise ValueError(
                f"the rollouts were sampled with different {name} values ({sorted(values)}); "
                "replay each setting's rollouts apart"
            )
    defaults = SamplerSettings()
    return SamplerSettings(
        **{
            name: values.pop() if values else getattr(defaults, name)
            for name, values in seen.items()
        }
    )


def _multinomial(
    probs: torch.Tensor, generator: flow.Generators, active: torch.Tensor
) -> torch.Tensor:
    """One token per row of `probs` `[B, V]`; per-row generators draw only for active rows."""
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    token = torch.zeros(probs.shape[0], dtype=torch.long)
    for b in torch.nonzero(active).flatten().tolist():
        token[b] = torch.multinomial(probs[b], 1, generator=generator[b])[0]
    return token


class TextSession:
    """What every backbone's session shares: text appended (`append_text`) and sampled
    (`sample_text`) through the backbone's own `append_tokens`, which keeps `last_logits` `[B, V]`
    at each row's last token. A backbone's session subclasses it and adds `append_tokens`,
    `append_image` and `generate_image` (`avr.backbone.protocol.BackboneSession`)."""

    def __init__(self, model, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.batch_size = model, batch_size
        self.device, self.dtype = device, dtype
        self.use_cache = True
        self.last_logits: torch.Tensor | None = None  # [B, V] at each row's last valid token
        tok = model.tokenizer
        self.image_start, self.image_end = tok.convert_tokens_to_ids([IMAGE_START, IMAGE_END])

    @classmethod
    def merge(cls, sessions: list[TextSession]) -> TextSession:
        """One session of `sessions`' rows; here only one session (returned as it is): a backbone
        whose sessions batch rows (`session_rows` not 1) overrides it, and `split`."""
        if len(sessions) != 1:
            raise ValueError(f"a {cls.__name__} does not merge sessions (got {len(sessions)})")
        return sessions[0]

    def split(self) -> list[TextSession]:
        """One session per row (here the one row)."""
        if self.batch_size != 1:
            raise ValueError(f"a {type(self).__name__} of {self.batch_size} rows does not split")
        return [self]

    def append_tokens(self, ids: list[list[int]]) -> None:
        """Append token ids per row (the backbone's own)."""
        raise NotImplementedError

    @torch.no_grad()
    def append_text(self, texts: list[str]) -> None:
        """Append one text per row (the prompt, a forced tag …); rows of different lengths pad."""
        tok = self.model.tokenizer
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        self.append_tokens(ids)

    @torch.no_grad()
    def sample_text(
        self,
        max_new_tokens: int,
        stop: list[str] | list[list[str]] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: flow.Generators = None,
        active: torch.Tensor | None = None,
    ) -> TextSample:
        """Decode until a stop token (default `<eos>`; `stop` may hold one list per row) or
        `max_new_tokens`.

        `temperature = 0` is greedy. Log-probs are `log softmax(logits / temperature)` of the chosen
        token, before top-k/top-p filtering: the policy's own distribution, as GRPO needs it.
        """
        if self.last_logits is None:
            raise ValueError("append a prompt before sampling text")
        tok = self.model.tokenizer
        stops = stop or [tok.eos_token]
        per_row = stops if isinstance(stops[0], list) else [stops] * self.batch_size
        if len(per_row) != self.batch_size:
            raise ValueError(f"got {len(per_row)} stop lists for a batch of {self.batch_size}")
        stop_ids = [set(tok.convert_tokens_to_ids(row)) for row in per_row]
        active = self._active(active).clone()
        warpers = LogitsProcessorList()
        if temperature > 0:
            warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        ids: list[list[int]] = [[] for _ in range(self.batch_size)]
        logps: list[list[float]] = [[] for _ in range(self.batch_size)]
        # Rows that stopped would keep costing a row of compute per token: once at most half the
        # rows still write, the rest of the decoding runs on those rows alone (their caches taken
        # out and put back; per-row generators draw the same tokens either way).
        can_shrink = self.use_cache and (temperature == 0 or isinstance(generator, list))
        for written in range(max_new_tokens):
            if not active.any():
                break
            if can_shrink and self.batch_size > 1 and int(active.sum()) <= self.batch_size // 2:
                rows = torch.nonzero(active).flatten().tolist()
                sub = self._take(rows)
                rest = sub.sample_text(
                    max_new_tokens - written,
                    [list(per_row[b]) for b in rows],
                    temperature,
                    top_k,
                    top_p,
                    [generator[b] for b in rows] if isinstance(generator, list) else generator,
                )
                self._put(rows, sub)
                for i, b in enumerate(rows):
                    ids[b] += rest.ids[i]
                    logps[b] += rest.logprobs[i]
                break
            logits = self.last_logits
            policy = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
            if temperature > 0:
                probs = torch.softmax(warpers(None, logits.clone()), dim=-1).cpu()
                token = _multinomial(probs, generator, active).to(self.device)
            else:
                token = logits.argmax(-1)
            chosen = policy.gather(1, token[:, None])[:, 0].tolist()
            tokens, running = token.tolist(), active.tolist()
            for b in range(self.batch_size):
                if running[b]:
                    ids[b].append(tokens[b])
                    logps[b].append(chosen[b])
            self.append_tokens([[t] if r else [] for t, r in zip(tokens, running, strict=True)])
            stopped = [r and t in row for r, t, row in zip(running, tokens, stop_ids, strict=True)]
            active &= ~torch.tensor(stopped, device=self.device)
        return TextSample(ids, logps, [tok.decode(r) for r in ids], temperature or 1.0)

    def _take(self, rows: list[int]) -> TextSession:
        """A session of `rows` alone (their caches taken out); only backbones that batch rows."""
        raise NotImplementedError

    def _put(self, rows: list[int], sub: TextSession) -> None:
        """Put `_take`'s session back into `rows`."""
        raise NotImplementedError

    def _active(self, active: torch.Tensor | None) -> torch.Tensor:
        if active is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        return active.to(self.device)


class Session(TextSession):
    """Incremental generation for a batch of `batch_size` sequences on one `UnifiedModel`."""

    def __init__(self, model: UnifiedModel, batch_size: int, cache: bool = True) -> None:
        param = next(model.parameters())
        super().__init__(model, batch_size, param.device, param.dtype)
        self.use_cache = cache
        self.cache = KVCache()
        self.position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # Without a cache, the history of inputs is kept and re-run at every call.
        self._history: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]
        ] = []

    # ---- batching sessions ------------------------------------------------------------------

    @classmethod
    def merge(cls, sessions: list[Session]) -> Session:
        """One session whose rows are `sessions`' rows (cached, on one model): each row's cache is
        padded at the end with positions nothing attends to. The cache is a set of keys/values
        with their positions already applied, so padding changes no row's result (up to float
        rounding). Undo with `split`; a single session is returned as it is."""
        if len(sessions) == 1:
            return sessions[0]
        first = sessions[0]
        if any(s.model is not first.model or not s.use_cache for s in sessions):
            raise ValueError("merge needs cached sessions of one model")
        merged = cls(first.model, sum(s.batch_size for s in sessions))
        merged.position = torch.cat([s.position for s in sessions])
        filled = [s for s in sessions if s.cache.length]
        if not filled:  # nothing read yet (the first call of a batch of episodes)
            return merged
        length = max(s.cache.length for s in sessions)
        template = filled[0].cache

        def padded(tensor: torch.Tensor | None, like: torch.Tensor, dim: int, value=0):
            if tensor is None:  # an empty session: zero width
                shape = list(like.shape)
                shape[0], shape[dim] = 1, 0
                tensor = like.new_full(shape, value)
            pad = [0, 0] * (tensor.ndim - 1 - dim) + [0, length - tensor.shape[dim]]
            return torch.nn.functional.pad(tensor, pad, value=value)

        def layer(s: Session, kind: str, i: int) -> torch.Tensor:
            like = getattr(template, kind)[i]
            return padded(getattr(s.cache, kind)[i] if s.cache.length else None, like, 2)

        for kind in ("keys", "values"):
            stacked = [
                torch.cat([layer(s, kind, i) for s in sessions]) for i in range(len(template.keys))
            ]
            setattr(merged.cache, kind, stacked)
        merged.cache.valid = torch.cat(
            [padded(s.cache.valid, template.valid, 1, False) for s in sessions]
        )
        logits = next(s.last_logits for s in filled)
        merged.last_logits = torch.cat(
            [
                s.last_logits if s.last_logits is not None else torch.zeros_like(logits)
                for s in sessions
            ]
        )
        return merged

    def split(self) -> list[Session]:
        """One session per row, each cache holding only its row's attended positions."""
        if self.batch_size == 1:
            return [self]
        rows = []
        for b in range(self.batch_size):
            row = type(self)(self.model, 1)
            row.position = self.position[b : b + 1].clone()
            if not self.cache.length:
                rows.append(row)
                continue
            keep = torch.nonzero(self.cache.valid[b]).flatten()
            row.cache.keys = [k[b : b + 1, :, keep] for k in self.cache.keys]
            row.cache.values = [v[b : b + 1, :, keep] for v in self.cache.values]
            row.cache.valid = self.cache.valid[b : b + 1, keep]
            row.last_logits = None if self.last_logits is None else self.last_logits[b : b + 1]
            if not len(keep):  # this row has read nothing
                row.cache, row.last_logits = KVCache(), None
            rows.append(row)
        return rows

    # ---- appending context ------------------------------------------------------------------

    @torch.no_grad()
    def append_tokens(self, ids: list[list[int]]) -> None:
        """Append token ids per row (an empty list appends nothing to that row)."""
        if len(ids) != self.batch_size:
            raise ValueError(f"got {len(ids)} rows for a batch of {self.batch_size}")
        width = max(1, max(len(r) for r in ids))
        tokens = torch.full(
            (self.batch_size, width), self.model.tokenizer.pad_token_id, dtype=torch.long
        )
        valid = torch.zeros(self.batch_size, width, dtype=torch.bool)
        for b, row in enumerate(ids):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            valid[b, : len(row)] = True
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        if not valid.any():
            return
        hidden = self._run(
            self.model.decoder.embed_tokens(tokens), valid, gen=False, full=False, store=True
        )
        last = valid.sum(1) - 1
        rows = torch.arange(self.batch_size, device=self.device)
        logits = self.model.logits(hidden[rows, last.clamp(min=0)]).float()  # [B, V]
        has = valid.any(1)
        self.last_logits = (
            logits
            if self.last_logits is None
            else torch.where(has[:, None], logits, self.last_logits)
        )

    @torch.no_grad()
    def append_image(self, pixels: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Read images `[B, 3, H, W]` (an input image, or one just drawn): `<img>`, its clean
        copies, `</img>`."""
        active = self._active(active)
        self._append_marker(self.image_start, active)
        self._append_clean(pixels, active)

    # ---- text -------------------------------------------------------------------------------

    # ---- images -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_image(
        self,
        steps: int = 25,
        cfg_scale: float = 1.0,
        noise_level: float = 0.0,
        shift: float = 1.0,
        read: bool = True,
        sde_window: tuple[int, int] | None = None,
        generator: flow.Generators = None,
        active: torch.Tensor | None = None,
        start: bool = True,
        noise_generator: flow.Generators = None,
    ) -> ImageSample:
        """Draw one image per row after `<img>`.

        `noise_level = 0` is the ODE (Euler) sampler; `> 0` is Flow-GRPO's SDE with per-step
        log-probs; with `sde_window = (first, last)` only those steps are stochastic and the
        others follow the ODE (MixGRPO's mixed sampler; their log-probs are NaN). `cfg_scale ≠ 1` mixes in the unconditional velocity (the image's tokens alone, as
        trained with CFG dropout): `v = v_u + w·(v_c − v_u)`. With `read`, the image is then read
        back (clean copy and `</img>`) so later text can refer to it. `start=False` when the model
        itself already wrote the `<img>`. The starting noise comes from `noise_generator` where
        given (rollouts that share it start from the same noise), else from `generator`.
        """
        model = self.model
        active = self._active(active)
        if start:
            self._append_marker(self.image_start, active)
        geometry = model.geometry
        shape = (self.batch_size, geometry.gen_tokens, geometry.token_dim)
        start_from = generator if noise_generator is None else noise_generator
        x = flow.randn(shape, start_from).to(self.device, self.dtype)
        times = flow.schedule(steps, shift)
        path, logps = [x], []
        for i in range(steps):
            t, t_next = float(times[i]), float(times[i + 1])
            v = self._velocity(x, t, conditional=True)
            if cfg_scale != 1.0:
                v_u = self._velocity(x, t, conditional=False)
                v = v_u + cfg_scale * (v - v_u)
            stochastic = sde_window is None or sde_window[0] <= i < sde_window[1]
            if noise_level > 0 and not stochastic:
                x = flow.ode_step(x, v, t, t_next)
                logps.append(torch.full((x.shape[0],), float("nan"), device=x.device))
            elif noise_level > 0:
                x, logp = flow.sde_step(x, v, t, t_next, noise_level, float(times[1]), generator)
                logps.append(logp)
            else:
                x = flow.ode_step(x, v, t, t_next)
            path.append(x)
        pixels = model.codec.decode(model.codec.from_tokens(x.float()))
        # 8-bit, as the image is stored in the trajectory: what later steps read here is what
        # teacher-forced replay (SFT on rollouts, RL) reads from the saved image
        pixels = (pixels * 255).round() / 255
        if read:
            self._append_clean(pixels.to(self.dtype), active)
        else:
            self.position = self.position + active.long()
        nfe = steps * (2 if cfg_scale != 1.0 else 1)
        return ImageSample(
            pixels,
            torch.stack(path),
            times,
            torch.stack(logps, 1) if logps else None,
            nfe,
            noise_level,
            cfg_scale,
        )

    def _velocity(self, x: torch.Tensor, t: float, conditional: bool) -> torch.Tensor:
        model = self.model
        time = torch.full((self.batch_size,), t, device=self.device, dtype=self.dtype)
        if not conditional:  # the image's tokens alone, as the trainer recomputes it
            return model.unconditional_velocity(x, time)
        embeds = model.embed_latents(x, time)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=self.device)
        hidden = self._run(embeds, valid, gen=True, full=True, store=False, advance=False)
        return model.velocity(hidden, x, time)

    # ---- internals --------------------------------------------------------------------------

    def _take(self, rows: list[int]) -> Session:
        """A cached session of `rows` alone (their caches copied out; `_put` writes them back)."""
        index = torch.tensor(rows, device=self.device)
        sub = type(self)(self.model, len(rows))
        sub.position = self.position[index]
        sub.cache.keys = [k[index] for k in self.cache.keys]
        sub.cache.values = [v[index] for v in self.cache.values]
        sub.cache.valid = self.cache.valid[index]
        sub.last_logits = None if self.last_logits is None else self.last_logits[index]
        return sub

    def _put(self, rows: list[int], sub: Session) -> None:
        """Write `sub` (taken with `_take(rows)`, then extended) back into `rows`: every other
        row's cache is padded with positions nothing attends to, as `merge` pads."""
        index = torch.tensor(rows, device=self.device)
        grown = sub.cache.length - self.cache.length

        def pad(tensor: torch.Tensor, dim: int, value=0) -> torch.Tensor:
            widths = [0, 0] * (tensor.ndim - 1 - dim) + [0, grown]
            return torch.nn.functional.pad(tensor, widths, value=value)

        for kind in ("keys", "values"):
            layers = [pad(t, 2) for t in getattr(self.cache, kind)]
            for mine, theirs in zip(layers, getattr(sub.cache, kind), strict=True):
                mine[index] = theirs
            setattr(self.cache, kind, layers)
        self.cache.valid = pad(self.cache.valid, 1, False)
        self.cache.valid[index] = sub.cache.valid
        self.position = self.position.clone()
        self.position[index] = sub.position
        self.last_logits = self.last_logits.clone()
        self.last_logits[index] = sub.last_logits

    def _append_marker(self, token: int, active: torch.Tensor) -> None:
        self.append_tokens([[token] if a else [] for a in active.tolist()])

    def _append_clean(self, pixels: torch.Tensor, active: torch.Tensor) -> None:
        """The image's clean copies (as the training layout has them: codec latents at t = 0, then
        vision tokens, per `image_context`), each bidirectional, at one position; then `</img>`."""
        geometry, pixels = self.model.geometry, pixels.to(self.device)
        copies = []
        if geometry.latent_context:
            copies.append((self.model.embed_clean(pixels.to(self.dtype)), True))  # [B, N, D]
        if geometry.vit_context:
            copies.append((self.model.embed_images(pixels), False))  # [B, P, D]
        for embeds, gen in copies:
            valid = active[:, None].expand(embeds.shape[:2])
            self._run(embeds, valid, gen=gen, full=True, store=True, advance=False)
        self.position = self.position + active.long()
        self._append_marker(self.image_end, active)

    def _run(
        self,
        x,
        valid,
        gen: bool,
        full: bool,
        store: bool,
        advance: bool = True,
    ):
        """Run new tokens `x` `[B, L, D]` after the context; `full`: bidirectional among them
        (an image copy), else causal. Text advances positions token by token; an image copy sits
        at one position."""
        batch, length = valid.shape
        if full:
            position = self.model.copy_positions(self.position[:, None].expand(batch, length))
        else:
            position = self.position[:, None] + valid.long().cumsum(1) - 1
            position = self.model.rope_positions(position, None)
        is_gen = torch.full((batch, length), gen, dtype=torch.bool, device=self.device)
        own = self._intra(valid, full)  # [B, L, L]
        if self.use_cache:
            past = self.cache.valid if self.cache.length else valid.new_zeros(batch, 0)
            mask = torch.cat([past[:, None, :].expand(batch, length, -1), own], dim=2)[:, None]
            hidden = self.model.run_layers(
                x, position, is_gen, mask=mask, cache=self.cache, store=store
            )
        else:
            hidden = self._recompute(x, position, is_gen, own)
        if store:
            self.cache.valid = (
                valid if self.cache.valid is None else torch.cat([self.cache.valid, valid], 1)
            )
            if not self.use_cache:
                self._history.append((x, position, is_gen, valid, full))
        if advance:
            self.position = self.position + valid.long().sum(1)
        return hidden

    def _intra(self, valid: torch.Tensor, full: bool) -> torch.Tensor:
        """Mask `[B, L, L]` among one chunk of new tokens: all-to-all (`full`) or causal, only to
        valid tokens; every token also sees itself, so padding rows stay finite."""
        length = valid.shape[1]
        idx = torch.arange(length, device=self.device)
        intra = (
            torch.ones(length, length, dtype=torch.bool, device=self.device)
            if full
            else idx[:, None] >= idx[None, :]
        )
        return (
            intra[None] & valid[:, None, :]
            | torch.eye(length, dtype=torch.bool, device=self.device)[None]
        )

    def _recompute(self, x, position, is_gen, own):
        """Run the whole history plus `x` without a cache; return `x`'s hidden states."""
        chunks = self._history
        xs = torch.cat([c[0] for c in chunks] + [x], 1)
        positions = torch.cat([c[1] for c in chunks] + [position], -1)
        gens = torch.cat([c[2] for c in chunks] + [is_gen], 1)
        blocks = [self._intra(c[3], c[4]) for c in chunks] + [own]
        total = xs.shape[1]
        mask = torch.zeros(x.shape[0], total, total, dtype=torch.bool, device=self.device)
        start = 0
        for block in blocks:  # each chunk sees the valid tokens of every earlier chunk
            n = block.shape[-1]
            mask[:, start : start + n, start : start + n] = block
            if start:
                mask[:, start : start + n, :start] = self.cache.valid[:, None, :start]
            start += n
        hidden = self.model.run_layers(xs, positions, gens, mask=mask[:, None])
        return hidden[:, total - x.shape[1] :]
