"""Pack trajectories into rows of tokens with no padding between samples, and the exact mask.

One trajectory becomes (positions are RoPE positions; an image takes one position):

    <bos> prompt…  <img> [N noisy] [N clean latent] [M vision] </img>  text…  <eos>

- A generated image (draft, sketch, refined, final) contributes a *noisy copy* that carries the flow
  loss; if anything follows it, also its *clean copies* that later tokens read, and `</img>`. An
  input image contributes only its clean copies. The clean copies are, as the model's
  `image_context` says, its codec tokens at t = 0 (`LATENT`: what a later edit or plan step copies
  from, as in BAGEL), its vision-encoder tokens (`READ`: understanding), or both, in that order.
- Masks: text is causal; the tokens of one copy attend to each other bidirectionally; a noisy copy
  is seen by nobody outside itself; nothing attends across samples; a noisy copy dropped for
  classifier-free guidance (`uncond`) sees only itself. A clean copy sees what came before it.
- CE targets: every text token the model writes (`Segment.loss`), `<img>` / `</img>` of generated
  images and `<eos>`, each predicted from the position before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from einops import rearrange
from transformers import PreTrainedTokenizerBase

from avr.backbone.rope import image_grid
from avr.backbone.tokenizer import IMAGE_END, IMAGE_START
from avr.flow import sample_timesteps
from avr.sequence import Trajectory, TrajectoryError, image_to_array

PAD, TEXT, GEN, READ, LATENT = 0, 1, 2, 3, 4


class TrajectoryTooLong(ValueError):
    """A trajectory takes more tokens than a packed row holds (`max_len`)."""


@dataclass(frozen=True)
class ImageGeometry:
    """How many tokens an image takes, what a generation token holds, and which clean copies an
    image that later tokens read contributes (`latent_context`, `vit_context`)."""

    image_size: int
    gen_tokens: int
    read_tokens: int
    token_dim: int
    latent_context: bool = False
    vit_context: bool = True


@dataclass(frozen=True)
class FlowSettings:
    """How training images are noised: timestep distribution and CFG dropout."""

    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_shift: float = 1.0
    cfg_dropout: float = 0.0


@dataclass
class PackedBatch:
    """Rows of packed tokens. Per token `[R, L]`: ids, `token_type` (PAD/TEXT/GEN/READ/LATENT), the
    trajectory it belongs to (`sample`, −1 for padding), its image copy (`block`, −1 for text),
    RoPE position, next-token label (−100: none) and `uncond`; per token `[R, L, 2]`, the
    `grid` cell of an image-copy token (−1 for text; `UnifiedConfig.image_rope`). Per generated image (row-major
    order): pixels, noise and timestep; per vision copy: pixels; per clean latent copy: pixels."""

    input_ids: torch.Tensor
    token_type: torch.Tensor
    sample: torch.Tensor
    block: torch.Tensor
    position: torch.Tensor
    labels: torch.Tensor
    uncond: torch.Tensor
    gen_pixels: torch.Tensor  # [M, 3, H, W]
    gen_noise: torch.Tensor  # [M, N, D_tok]
    gen_t: torch.Tensor  # [M]
    gen_sample: torch.Tensor  # [M] trajectory of each generated image
    read_pixels: torch.Tensor  # [K, 3, H, W]
    clean_pixels: torch.Tensor | None = None  # [C, 3, H, W]: images of the clean latent copies
    grid: torch.Tensor | None = None  # [R, L, 2]: (row, col) of image-copy tokens, −1 for text
    gen_xt: torch.Tensor | None = (
        None  # [M, N, D_tok]: given noisy states (RL) instead of noising pixels
    )

    def to(self, device) -> PackedBatch:
        """The batch on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: v.to(device) if v is not None else None for k, v in moved.items()})

    @property
    def tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.token_type != PAD).sum())

    def attention_mask(self) -> torch.Tensor:
        """Dense boolean mask `[R, 1, L, L]` (True: may attend), for SDPA."""
        length = self.token_type.shape[1]
        idx = torch.arange(length, device=self.token_type.device)
        return allowed(
            self.sample[:, :, None],
            self.sample[:, None, :],
            idx[None, :, None],
            idx[None, None, :],
            self.block[:, :, None],
            self.block[:, None, :],
            self.token_type[:, None, :],
            self.uncond[:, :, None],
        )[:, None]

    def mask_mod(self):
        """The same rule as a FlexAttention `mask_mod(b, h, q, kv)`."""
        sample, block, kind, uncond = self.sample, self.block, self.token_type, self.uncond

        def mask_mod(b, h, q, kv):
            return allowed(
                sample[b, q],
                sample[b, kv],
                q,
                kv,
                block[b, q],
                block[b, kv],
                kind[b, kv],
                uncond[b, q],
            )

        return mask_mod


def allowed(q_sample, k_sample, q_pos, k_pos, q_block, k_block, k_kind, q_uncond):
    """May query token q attend key token k? (see the module docstring). Padding attends itself."""
    same_block = (q_block == k_block) & (q_block >= 0)
    visible = (k_pos <= q_pos) & (k_kind != GEN) & ~q_uncond
    same_sample = (q_sample == k_sample) & (q_sample >= 0)
    padding_self = (q_sample < 0) & (q_pos == k_pos)
    return (same_sample & (visible | same_block)) | padding_self


def pack(
    trajectories: Sequence[Trajectory],
    tokenizer: PreTrainedTokenizerBase,
    geometry: ImageGeometry,
    max_len: int,
    seeds: Sequence[int] | None = None,
    flow: FlowSettings = FlowSettings(),
    packed: bool = True,
    rl: bool = False,
    states: Sequence[Sequence[Sequence[tuple[torch.Tensor, float]]]] | None = None,
) -> PackedBatch:
    """Pack `trajectories` into rows of at most `max_len` tokens (first fit, longest first);
    `packed=False` gives the padded baseline instead, one trajectory per row.

    `rl=True` lays out policy rollouts as they were sampled: text from the sampled token ids, CE
    targets exactly the sampled tokens (segments with log-probs), no forced markers or `<eos>`
    as targets, `<img>` not repeated where the model wrote it.

    Each trajectory's noise, timesteps and CFG dropout come from its own seed (`seeds[i]`, default
    `i`), so a trajectory is noised the same whether packed alone or with others. `states` (RL)
    gives instead, per trajectory and generated image in order, the noisy states `(x_t [N, D_tok],
    t)` to train on (steps of the rollout's own denoising path): the batch's `gen_xt` and `gen_t`.
    An image with K states gets K noisy blocks at its place, one per state; noisy tokens are seen
    only by their own block, so each block is a replay of that step after the same context, and
    the context is run once for all K.
    """
    if states is not None and len(states) != len(trajectories):
        raise ValueError(f"got states for {len(states)} of {len(trajectories)} trajectories")
    seeds = list(range(len(trajectories))) if seeds is None else list(seeds)
    if len(seeds) != len(trajectories):
        raise ValueError(f"got {len(seeds)} seeds for {len(trajectories)} trajectories")
    laid = [
        _layout(t, i, tokenizer, geometry, s, flow, rl, None if states is None else states[i])
        for i, (t, s) in enumerate(zip(trajectories, seeds, strict=True))
    ]
    for i, item in enumerate(laid):
        if len(item["ids"]) > max_len:
            raise TrajectoryTooLong(
                f"trajectory {i} takes {len(item['ids'])} tokens, over the maximum length "
                f"{max_len} (model.init_args.max_len)"
            )
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(laid)), key=lambda i: -len(laid[i]["ids"])):
        n = len(laid[i]["ids"])
        row = next((r for r in range(len(rows)) if room[r] >= n), None) if packed else None
        if row is None:
            rows.append([])
            room.append(max_len)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return _assemble([[laid[i] for i in row] for row in rows], geometry)


def token_count(
    trajectory: Trajectory, tokenizer, geometry: ImageGeometry, rl: bool = False
) -> int:
    """Tokens `trajectory` takes in a packed row (one noisy block per generated image; each
    further RL state of an image adds `geometry.gen_tokens`)."""
    return len(_layout(trajectory, 0, tokenizer, geometry, 0, FlowSettings(), rl)["ids"])


class _Layout:
    """One trajectory's tokens as they are laid out (see the module docstring), built segment by
    segment: per token its id, kind, RoPE position, whether it is trained, its image copy and grid
    cell; per image copy its pixels."""

    def __init__(self, tokenizer, geometry: ImageGeometry, rl: bool) -> None:
        self.tokenizer, self.geometry, self.rl = tokenizer, geometry, rl
        self.ids, self.kind, self.pos, self.train = [tokenizer.bos_token_id], [TEXT], [0], [False]
        self.cells: list[tuple[int, int]] = [(-1, -1)]  # (row, col) in an image copy, else −1
        self.copies = [-1]  # which image copy of this trajectory a token belongs to (-1: text)
        self.gen_cells = image_grid(geometry.gen_tokens, geometry.gen_tokens).tolist()
        self.read_cells = image_grid(geometry.read_tokens, geometry.gen_tokens).tolist()
        self.gen_pixels: list[torch.Tensor] = []
        self.read_pixels: list[torch.Tensor] = []
        self.clean_pixels: list[torch.Tensor] = []
        self.gen_states: list[tuple[torch.Tensor, float]] = []  # RL: one per noisy block
        self.p, self.copy, self.generated_images = 1, 0, 0
        self.start, self.end = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])

    def add(self, token, k, position, trained, block=-1, cell=(-1, -1)) -> None:
        self.ids.append(token)
        self.kind.append(k)
        self.pos.append(position)
        self.train.append(trained)
        self.copies.append(block)
        self.cells.append(cell)

    def text(self, seg) -> None:
        """A text segment: the sampled ids where RL replays them, else the tokenized text."""
        sampled = seg.sample.ids if seg.sample is not None else None
        tokens = (
            sampled[0]
            if self.rl and sampled
            else self.tokenizer.encode(seg.text, add_special_tokens=False)
        )
        for token in tokens:
            self.add(token, TEXT, self.p, seg.logprobs is not None if self.rl else seg.loss)
            self.p += 1

    def image(self, seg, later: bool, states) -> None:
        """An image segment: `<img>`, a noisy copy per state where the model generates it, its
        clean copies where anything follows it (or it is read), `</img>`."""
        geometry, pad = self.geometry, self.tokenizer.pad_token_id
        pixels = rearrange(
            torch.from_numpy(image_to_array(seg.image, geometry.image_size)), "h w c -> c h w"
        )
        # An image the model drew but must not learn to draw (`loss=False`: a draft the verifier
        # rejected, kept as context for the critique that follows) is laid out as read, like an input.
        generated = seg.role.generated and (self.rl or seg.loss)
        p = self.p
        if self.rl and self.ids[-1] == self.start:  # the model wrote <img> itself
            p -= 1
        else:
            self.add(self.start, TEXT, p, generated and not self.rl)
        if generated:
            for state in [None] if states is None else states[self.generated_images]:
                for cell in self.gen_cells:
                    self.add(pad, GEN, p + 1, False, self.copy, cell)
                self.gen_pixels.append(pixels)
                if state is not None:
                    self.gen_states.append(state)
                self.copy += 1
            self.generated_images += 1
        if generated and not later:
            self.p = p + 2
            return
        for wanted, kind, cells, store in (
            (geometry.latent_context, LATENT, self.gen_cells, self.clean_pixels),
            (geometry.vit_context, READ, self.read_cells, self.read_pixels),
        ):
            if wanted:
                for cell in cells:
                    self.add(pad, kind, p + 1, False, self.copy, cell)
                store.append(pixels)
                self.copy += 1
        self.add(self.end, TEXT, p + 2, generated and not self.rl)
        self.p = p + 3


def _layout(
    traj: Trajectory,
    index: int,
    tokenizer,
    geometry: ImageGeometry,
    seed: int,
    flow: FlowSettings,
    rl: bool = False,
    states: Sequence[Sequence[tuple[torch.Tensor, float]]] | None = None,
):
    if states is not None:
        images = sum(seg.is_image and seg.role.generated for seg in traj.segments)
        if len(states) != images or not all(states):
            raise ValueError(
                f"trajectory {index}: states for {len(states)} images ({[len(s) for s in states]}"
                f" each) for {images} generated images (each needs ≥ 1)"
            )
    restarts = sum(seg.restarts for seg in traj.segments[1:])
    if restarts:
        raise TrajectoryError(
            f"trajectory {index} holds {restarts + 1} tries, each in a fresh context (a `retry` "
            "rollout): lay out one context at a time (avr.sequence.tries)"
        )
    laid = _Layout(tokenizer, geometry, rl)
    segments = traj.segments
    for s, seg in enumerate(segments):
        if seg.is_image:
            laid.image(seg, later=s < len(segments) - 1, states=states)
        else:
            laid.text(seg)
    if not rl and segments and not segments[-1].is_image and segments[-1].loss:
        laid.add(tokenizer.eos_token_id, TEXT, laid.p, True)
    g = torch.Generator().manual_seed(int(seed))
    n_gen = len(laid.gen_pixels)
    noise = torch.randn((n_gen, geometry.gen_tokens, geometry.token_dim), generator=g)
    t = sample_timesteps(n_gen, flow.timestep_mean, flow.timestep_std, flow.timestep_shift, g)
    uncond = torch.rand(n_gen, generator=g) < flow.cfg_dropout
    xt = None
    if states is not None:
        xt = torch.stack([x for x, _ in laid.gen_states]) if laid.gen_states else noise[:0]
        t = torch.tensor([float(time) for _, time in laid.gen_states], dtype=t.dtype)
    return {
        "index": index,
        "ids": laid.ids,
        "kind": laid.kind,
        "pos": laid.pos,
        "train": laid.train,
        "copy": laid.copies,
        "grid": laid.cells,
        "gen_pixels": laid.gen_pixels,
        "read_pixels": laid.read_pixels,
        "clean_pixels": laid.clean_pixels,
        "noise": noise,
        "t": t,
        "uncond": uncond,
        "xt": xt,
    }


def _assemble(rows: list[list[dict]], geometry: ImageGeometry) -> PackedBatch:
    length = max(sum(len(item["ids"]) for item in row) for row in rows)
    shape = (len(rows), length)
    arrays = {
        "input_ids": np.zeros(shape, np.int64),
        "token_type": np.full(shape, PAD, np.int64),
        "sample": np.full(shape, -1, np.int64),
        "block": np.full(shape, -1, np.int64),
        "position": np.zeros(shape, np.int64),
        "labels": np.full(shape, -100, np.int64),
        "uncond": np.zeros(shape, bool),
        "grid": np.full((*shape, 2), -1, np.int64),
    }
    gen_pixels, noise, t, gen_sample, read_pixels, clean_pixels = [], [], [], [], [], []
    xts = []
    blocks = 0
    for r, row in enumerate(rows):
        offset = 0
        for item in row:
            n = len(item["ids"])
            span = slice(offset, offset + n)
            arrays["input_ids"][r, span] = item["ids"]
            arrays["token_type"][r, span] = item["kind"]
            arrays["sample"][r, span] = item["index"]
            arrays["position"][r, span] = item["pos"]
            arrays["grid"][r, span] = item["grid"]
            local = np.array(item["copy"])
            arrays["block"][r, span] = np.where(local >= 0, local + blocks, -1)
            blocks += int(local.max()) + 1
            train = np.array(item["train"])
            labels = np.where(train[1:], np.array(item["ids"][1:]), -100)
            arrays["labels"][r, offset : offset + n - 1] = labels
            kinds = np.array(item["kind"])
            gen_copy = np.where(kinds == GEN, local, -1)
            for j, copy in enumerate(sorted(set(gen_copy[gen_copy >= 0].tolist()))):
                arrays["uncond"][r, offset + np.nonzero(gen_copy == copy)[0]] = bool(
                    item["uncond"][j]
                )
            gen_pixels += item["gen_pixels"]
            read_pixels += item["read_pixels"]
            clean_pixels += item["clean_pixels"]
            noise.append(item["noise"])
            t.append(item["t"])
            xts.append(item["xt"])
            gen_sample += [item["index"]] * len(item["gen_pixels"])
            offset += n
    side = geometry.image_size

    def stacked(images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images) if images else torch.zeros(0, 3, side, side)

    return PackedBatch(
        **{k: torch.from_numpy(v) for k, v in arrays.items()},
        gen_pixels=stacked(gen_pixels),
        gen_noise=torch.cat(noise),
        gen_t=torch.cat(t),
        gen_sample=torch.tensor(gen_sample, dtype=torch.long),
        read_pixels=stacked(read_pixels),
        clean_pixels=stacked(clean_pixels),
        gen_xt=None if any(x is None for x in xts) else torch.cat(xts),
    )


@dataclass
class Packer:
    """`pack` with its settings bound: a picklable collate function for data-loader workers."""

    tokenizer: PreTrainedTokenizerBase
    geometry: ImageGeometry
    max_len: int
    flow: FlowSettings = FlowSettings()

    def __call__(self, trajectories: Sequence[Trajectory], seeds: Sequence[int]) -> PackedBatch:
        """Pack one batch."""
        return pack(trajectories, self.tokenizer, self.geometry, self.max_len, seeds, self.flow)
