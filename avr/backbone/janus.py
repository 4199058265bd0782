"""A discrete-token backbone: transformers' `JanusForConditionalGeneration`, where the language
model itself writes an image as a sequence of VQ codebook tokens.

`JanusBackbone` offers what the modes and trainers use of a backbone (`tokenizer`, `config`,
`session()`), so every mode plugin runs on it unchanged:

- text is decoded by the LM head; an input image is read through Janus's SigLIP encoder and
  aligner between `<img>` and `</img>`;
- an image is drawn token by token by the generation head over the VQ codebook (sampled at
  temperature 1 when the sampler is stochastic, `noise_level > 0`; greedy otherwise), its tokens
  enter the context through the generation embeddings, then `</img>`; classifier-free guidance
  mixes in the logits of an unconditional context (`<img>` alone);
- `replay` runs a rolled-out trajectory in one teacher-forced forward pass and returns the
  log-probs of every sampled token, text and image alike, which is what GRPO trains here;
  `sft_loss` is the same pass over teacher trajectories (images VQ-encoded by the frozen VQ-VAE):
  cross-entropy on text and on image tokens.

Weights stay in the transformers format: `save_pretrained` writes Janus's own folder (its
`config.json` and safetensors), the tokenizer, and `avr_janus.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    DynamicCache,
    JanusConfig,
    JanusForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

from avr.backbone.generation import ImageSample, TextSession, sampler_settings
from avr.backbone.protocol import PolicyTerms, register_backbone
from avr.backbone.tokenizer import DEFAULT_MODES, IMAGE_END, IMAGE_START, add_special_tokens
from avr.grpo import k3
from avr.outputs import check_only_written, publish, staging_dir
from avr.sequence import image_to_array

SETTINGS = "avr_janus.json"


@dataclass
class JanusSettings:
    """What avr needs besides Janus's own config."""

    image_size: int
    """Side of the images read and written, in pixels (Janus's vision and VQ sizes agree on it)."""
    modes: tuple[str, ...] = DEFAULT_MODES
    """Modes the tokenizer has a `<mode:…>` token for."""

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the inverse of `JanusSettings(**d)`)."""
        return {"image_size": self.image_size, "modes": list(self.modes)}


def tiny_janus_config(vocab_size: int, image_size: int = 64) -> JanusConfig:
    """A tiny random Janus for tests and CPU runs: a 2-layer Llama core of width 64, a 1-layer
    SigLIP reader (16 px patches) and a VQ-VAE with 16 px cells over a 256-entry codebook (Janus
    ties the VQ grid to the reader's patch grid: 16 image tokens for 64 px)."""
    width = 64
    return JanusConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": width,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
            "num_image_tokens": (image_size // 16) ** 2,
            "projection_dim": width,
            "depth": 2,
        },
        vq_config={
            "base_channels": 32,
            "channel_multiplier": [1, 1, 1, 2, 2],  # 16 px cells, as Janus's vision patches
            "embed_dim": 8,
            "latent_channels": 32,
            "num_embeddings": 256,
            "num_res_blocks": 1,
            "num_patches": image_size // 16,
            "image_token_embed_dim": width,
            "projection_dim": width,
        },
    )


@dataclass
class _Layout:
    """A trajectory laid out for one pass: embedding pieces, the token at each position (−1 for
    a read image's features), positions with text / image targets, the sampler's log-probs."""

    pieces: list[torch.Tensor] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text_at: list[int] = field(default_factory=list)
    image_at: list[int] = field(default_factory=list)
    text_old: list[float] = field(default_factory=list)
    image_old: list[float] = field(default_factory=list)


@register_backbone
class JanusBackbone(torch.nn.Module):
    """Janus with avr's tokenizer; build with `JanusBackbone(JanusForConditionalGeneration(...),
    tokenizer, settings)` or `JanusBackbone.from_pretrained(dir)`."""

    kind = "janus"
    #: Sequences one session holds: the rollout engine runs Janus episodes one at a time.
    session_rows = 1
    ce_weight = 1.0  # text CE weight beside the image-token CE in `sft_loss`

    def __init__(
        self,
        janus: JanusForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        settings: JanusSettings,
    ) -> None:
        super().__init__()
        self.janus, self.tokenizer, self.config = janus, tokenizer, settings
        vision = janus.config.vision_config
        if vision.image_size != settings.image_size:
            raise ValueError(
                f"image_size {settings.image_size} differs from Janus's vision image_size {vision.image_size}"
            )
        vq = janus.config.vq_config
        drawn = vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
        if drawn != settings.image_size:
            raise ValueError(
                f"vq_config draws {drawn} px images (num_patches {vq.num_patches} × "
                f"2^{len(vq.channel_multiplier) - 1}), expected image_size {settings.image_size}"
            )
        self.image_tokens = vq.num_patches**2
        janus.model.vqmodel.requires_grad_(False)  # the tokenizer of images stays as it is
        if janus.get_input_embeddings().num_embeddings < len(tokenizer):
            janus.resize_token_embeddings(len(tokenizer))
        self._checkpointing = False

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute the LM's layers in the backward pass (transformers' gradient checkpointing)."""
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self._checkpointing = bool(value)
        lm = self.janus.model.language_model
        if value:
            lm.gradient_checkpointing_enable({"use_reentrant": False})
        elif lm.is_gradient_checkpointing:
            lm.gradient_checkpointing_disable()

    # ---- pieces -----------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.janus.get_input_embeddings()(ids)

    def embed_read_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `[K, 3, H, W]` in [0, 1] through SigLIP and the aligner → `[K, P, D]`."""
        expected = (3, self.config.image_size, self.config.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"expected images [B, {', '.join(map(str, expected))}], got {list(pixels.shape)}"
            )
        dtype = self.janus.get_input_embeddings().weight.dtype
        return self.janus.model.get_image_features(pixels.to(dtype) * 2 - 1).pooler_output

    def embed_image_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.janus.prepare_embeddings_for_image_generation(ids)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.janus.lm_head(hidden)[..., : len(self.tokenizer)]

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.janus.model.generation_head(hidden)

    def decode_image_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook tokens `[B, N]` → images `[B, 3, H, W]` in [0, 1]."""
        pixels = self.janus.model.vqmodel.decode(ids)
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    def run(self, embeds: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Causal LM over `embeds` `[1, L, D]` after `cache`'s tokens; returns hidden states."""
        out = self.janus.model.language_model(
            inputs_embeds=embeds, past_key_values=cache, use_cache=cache is not None
        )
        return out.last_hidden_state

    def session(self, batch_size: int = 1, cache: bool = True) -> JanusSession:
        """Incremental generation over a growing context (one sequence)."""
        return JanusSession(self, batch_size)

    # ---- training: one teacher-forced pass per trajectory -----------------------------------

    def layout(self, trajectory, teacher: bool) -> _Layout:
        """`trajectory` as the session builds it, with the positions that carry a loss.

        `teacher=False` (RL): the tokens the sampler recorded; targets where it recorded log-probs.
        `teacher=True` (SFT): text encoded, generated images VQ-encoded; targets: the text of
        segments with `loss`, a generated image's `<img>`, tokens and `</img>`, and `<eos>` after
        a final trained text."""
        tok = self.tokenizer
        start, end = tok.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
        device = self.janus.get_input_embeddings().weight.device
        out = _Layout()

        def tokens(values: list[int], trained: bool = False) -> None:
            if trained:
                out.text_at += range(len(out.ids), len(out.ids) + len(values))
            out.pieces.append(self.embed_text(torch.tensor([values], device=device)))
            out.ids.extend(values)

        tokens([tok.bos_token_id])
        segments = trajectory.segments
        for seg in segments:
            if not seg.is_image:
                sampled = None if teacher or seg.sample is None else seg.sample.ids
                values = sampled[0] if sampled else tok.encode(seg.text, add_special_tokens=False)
                if not teacher and seg.logprobs is not None:
                    out.text_old += seg.logprobs
                if values:
                    trained = seg.loss if teacher else seg.logprobs is not None
                    tokens(list(values), trained)
                continue
            generated = seg.role.generated
            if out.ids[-1] != start:
                tokens([start], teacher and generated)
            if generated and (teacher or seg.sample is not None):
                if teacher:
                    drawn = self.encode_image_tokens(self._pixels(seg.image, device))[0]
                else:
                    drawn = seg.sample.latents[0].to(device)
                if teacher or seg.logprobs is not None:
                    out.image_at += range(len(out.ids), len(out.ids) + len(drawn))
                    out.image_old += [] if teacher else seg.logprobs
                out.pieces.append(self.embed_image_tokens(drawn[None]))
                out.ids.extend(drawn.tolist())
            else:
                features = self.embed_read_image(self._pixels(seg.image, device))
                out.pieces.append(features)
                out.ids.extend([-1] * features.shape[1])
            tokens([end], teacher and generated)
        if teacher and segments and not segments[-1].is_image and segments[-1].loss:
            tokens([tok.eos_token_id], True)
        return out

    def _pixels(self, image, device) -> torch.Tensor:
        array = torch.from_numpy(image_to_array(image, self.config.image_size))
        return array.permute(2, 0, 1)[None].to(device)

    @torch.no_grad()
    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [0, 1] → VQ codebook tokens `[B, N]` (the frozen VQ-VAE)."""
        vq = self.janus.model.vqmodel
        weight = next(vq.parameters())
        ids = vq.encode(pixels.to(weight.dtype) * 2 - 1).image_tokens
        return ids.reshape(pixels.shape[0], -1)

    def _forward(self, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states `[L, D]` of a layout, and its token ids `[L]`."""
        hidden = self.run(torch.cat(layout.pieces, 1))[0]
        return hidden, torch.tensor(layout.ids, device=hidden.device)

    def _target_logits(self, hidden, at: list[int], logits_fn) -> torch.Tensor:
        where = torch.tensor(at, dtype=torch.long, device=hidden.device)
        return logits_fn(hidden[where - 1]).float()

    def replay(self, trajectory, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Log-probs of the sampled tokens of `trajectory` (a rollout from this backbone's
        session) in one forward pass: `text`/`image` (this model, differentiable; text at
        `temperature`, image tokens at 1 as the session samples them) and `text_rollout`/
        `image_rollout` (what the sampler recorded), in sequence order."""
        layout = self.layout(trajectory, teacher=False)
        hidden, target = self._forward(layout)

        def logp(at: list[int], logits_fn, temperature: float) -> torch.Tensor:
            if not at:
                return hidden.new_zeros(0)
            logits = self._target_logits(hidden, at, logits_fn) / temperature
            where = torch.tensor(at, device=hidden.device)
            return torch.log_softmax(logits, -1).gather(-1, target[where, None])[:, 0]

        return {
            "text": logp(layout.text_at, self.text_logits, temperature),
            "image": logp(layout.image_at, self.image_logits, 1.0),
            "text_rollout": torch.tensor(layout.text_old, dtype=torch.float32),
            "image_rollout": torch.tensor(layout.image_old, dtype=torch.float32),
        }

    def policy_terms(self, trajectories, reference, plan) -> dict:
        """RL's replay of rollouts: every sampled token, text and image alike, each trajectory in
        one teacher-forced pass (`replay`); KL to the reference by the k3 estimator."""
        parts = {
            kind: {"logp": [], "ref": [], "old": [], "sample": []} for kind in ("text", "image")
        }
        temperature = sampler_settings(trajectories).temperature  # as the samples recorded it
        for b, trajectory in enumerate(trajectories):
            mine = self.replay(trajectory, temperature)
            ref = reference(lambda model, t=trajectory: model.replay(t, temperature))
            for kind, part in parts.items():
                part["logp"].append(mine[kind])
                part["ref"].append(ref[kind])
                part["old"].append(mine[f"{kind}_rollout"])
                part["sample"].append(torch.full((mine[kind].shape[0],), b, dtype=torch.long))
        terms = {}
        for kind, part in parts.items():
            logp = torch.cat(part["logp"])
            terms[kind] = PolicyTerms(
                logp=logp,
                kl=k3(logp, torch.cat(part["ref"])),
                sample=torch.cat(part["sample"]),
                recorded=torch.cat(part["old"]),
            )
        return terms

    def packer(self, max_len: int) -> None:
        """None: `sft_loss` takes the list of trajectories itself (one pass each)."""
        return None

    def checkpoint_config(self) -> dict[str, Any]:
        return {"janus": self.janus.config.to_dict(), "settings": self.config.to_dict()}

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], tokenizer) -> JanusBackbone:
        janus = JanusForConditionalGeneration(JanusConfig.from_dict(config["janus"]))
        return cls(janus, tokenizer, JanusSettings(**config["settings"]))

    def sft_loss(
        self, trajectories, ce_weight: float | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SFT on teacher trajectories: `ce_weight · CE(text) + CE(image tokens)`, each the mean
        over its targets in the batch (one teacher-forced pass per trajectory)."""
        losses = {"text": [], "image": []}
        counts = {"text": 0, "image": 0, "tokens": 0}
        for trajectory in trajectories:
            layout = self.layout(trajectory, teacher=True)
            hidden, target = self._forward(layout)
            counts["tokens"] += len(layout.ids)
            for kind, at, logits_fn in (
                ("text", layout.text_at, self.text_logits),
                ("image", layout.image_at, self.image_logits),
            ):
                if at:
                    logits = self._target_logits(hidden, at, logits_fn)
                    where = torch.tensor(at, device=hidden.device)
                    losses[kind].append(
                        torch.nn.functional.cross_entropy(logits, target[where], reduction="sum")
                    )
                    counts[kind] += len(at)
        zero = self.janus.lm_head.weight.sum() * 0
        text = sum(losses["text"], zero) / max(counts["text"], 1)
        image = sum(losses["image"], zero) / max(counts["image"], 1)
        stats = {
            "loss/text": text.detach(),
            "loss/image": image.detach(),
            "tokens": torch.tensor(float(counts["tokens"])),
            "tokens/image": torch.tensor(float(counts["image"])),
        }
        weight = self.ce_weight if ce_weight is None else ce_weight
        return weight * text + image, stats

    # ---- files ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write Janus's folder, the tokenizer and `avr_janus.json`, atomically."""
        directory = Path(directory)
        tmp = staging_dir(directory)
        try:
            self.janus.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / SETTINGS).write_text(
                json.dumps(self.config.to_dict(), indent=2), encoding="utf-8"
            )
            check_only_written(directory, [p.name for p in tmp.iterdir()], "a Janus save")
            publish(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @staticmethod
    def reads_folder(directory: str | os.PathLike) -> bool:
        """Whether `from_pretrained` reads `directory` (a transformers Janus folder; see
        `avr.backbone.protocol.folder_reader`)."""
        return is_janus_dir(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any
    ) -> JanusBackbone:
        """Load a Janus folder offline (one written by `save_pretrained`, or a transformers Janus
        checkpoint, whose tokenizer then gets avr's structural tokens)."""
        directory = Path(directory)
        check_janus_weights(directory)
        janus, info = JanusForConditionalGeneration.from_pretrained(
            directory, local_files_only=True, output_loading_info=True
        )
        wrong = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if wrong:  # after the check above, a transformers quirk; still never a random weight
            raise ValueError(f"{directory}: the weights do not load strictly: {wrong}")
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        settings_path = directory / SETTINGS
        saved = (
            json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
        )
        unknown = set(overrides) - {"image_size", "modes"}
        if unknown:
            raise ValueError(
                f"unknown Janus setting {sorted(unknown)[0]!r}; expected image_size or modes"
            )
        merged = {"image_size": janus.config.vision_config.image_size, **saved, **overrides}
        settings = JanusSettings(**merged)
        add_special_tokens(tokenizer, settings.modes)
        return cls(janus, tokenizer, settings).to(device)


def check_janus_weights(directory: str | os.PathLike) -> None:
    """Raise `ValueError` naming the first differences unless the folder's safetensors hold exactly
    the weights its `config.json` describes, with their shapes. Read from the config (a model
    built on the meta device, no memory) and the files' headers: a config of another family or
    size is refused before anything full-size is allocated, and no weight is left random."""
    directory = Path(directory)
    try:
        config = JanusConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{directory / 'config.json'}: not a Janus config ({err})") from None
    with torch.device("meta"):
        skeleton = JanusForConditionalGeneration(config)
    groups: dict[int, list[str]] = {}  # tied weights share one tensor: stored once is enough
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    expected = skeleton.state_dict()
    stored = _stored_shapes(directory)
    missing = [names[0] for names in groups.values() if not any(n in stored for n in names)]
    unexpected = [name for name in stored if name not in expected]
    resized = [
        f"{name} {list(stored[name])} where the config makes {list(expected[name].shape)}"
        for name in stored
        if name in expected and tuple(stored[name]) != tuple(expected[name].shape)
    ]
    problems = [
        (f"{len(missing)} weights missing", missing),
        (f"{len(unexpected)} weights the config does not know", unexpected),
        (f"{len(resized)} weights of another shape", resized),
    ]
    found = [
        f"{what}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''}"
        for what, names in problems
        if names
    ]
    if found:
        raise ValueError(f"{directory}: the weights do not match config.json ({'; '.join(found)})")


def _stored_shapes(directory: Path) -> dict[str, list[int]]:
    """Every tensor's shape in the folder's safetensors files (one file or an index of shards),
    read from their headers."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    shapes = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the Janus weights)")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    shapes[key] = f.get_slice(key).get_shape()
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a complete safetensors file ({err})") from None
    return shapes


def is_janus_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a transformers Janus checkpoint."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("model_type") == "janus"


class JanusSession(TextSession):
    """The session of `JanusBackbone` (`BackboneSession`): the same text sampling as the unified
    model's `Session`; images as codebook tokens; one sequence."""

    def __init__(self, model: JanusBackbone, batch_size: int = 1) -> None:
        if batch_size != 1:
            raise ValueError(f"a Janus session holds one sequence, got batch_size={batch_size}")
        param = model.janus.get_input_embeddings().weight
        super().__init__(model, 1, param.device, param.dtype)
        self.cache = DynamicCache()
        self.hidden: torch.Tensor | None = None

    def _extend(self, embeds: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Run `embeds` after the context (or after `cache`'s); the last hidden state `[1, D]`,
        kept as the main context's `hidden` (the image head reads it)."""
        last = self.model.run(embeds, self.cache if cache is None else cache)[:, -1]
        if cache is None:
            self.hidden = last
        return last

    @torch.no_grad()
    def append_tokens(self, ids: list[list[int]]) -> None:
        if len(ids) != 1:
            raise ValueError(f"got {len(ids)} rows for a batch of 1")
        if not ids[0]:
            return
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        last = self._extend(self.model.embed_text(tokens))
        self.last_logits = self.model.text_logits(last).float()

    @torch.no_grad()
    def append_image(self, pixels: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Read an input image: `<img>`, SigLIP features, `</img>`."""
        self.append_tokens([[self.image_start]])
        self._extend(self.model.embed_read_image(pixels.to(self.device)))
        self.append_tokens([[self.image_end]])

    @torch.no_grad()
    def generate_image(
        self,
        steps: int = 25,
        cfg_scale: float = 1.0,
        noise_level: float = 0.0,
        shift: float = 1.0,
        read: bool = True,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
        start: bool = True,
        sde_window: tuple[int, int] | None = None,
        noise_generator: torch.Generator | list | None = None,
    ) -> ImageSample:
        """Draw one image as codebook tokens after `<img>`; `steps`, `shift`, `sde_window` and
        `noise_generator` (no starting noise) have no meaning here. Sampled at temperature 1 with per-token log-probs when `noise_level > 0`, greedy
        otherwise."""
        model = self.model
        if isinstance(generator, list):  # one row: its own generator
            (generator,) = generator
        if start:
            self.append_tokens([[self.image_start]])
        if self.last_logits is None:
            raise ValueError("append a prompt before drawing an image")
        hidden = self.hidden
        uncond_cache, uncond = None, None
        if cfg_scale != 1.0:
            uncond_cache = DynamicCache()
            marker = torch.tensor(
                [[model.tokenizer.bos_token_id, self.image_start]], device=self.device
            )
            uncond = self._extend(model.embed_text(marker), uncond_cache)
        drawn, logps = [], []
        sample = noise_level > 0
        warp = LogitsProcessorList([TemperatureLogitsWarper(1.0)])
        for _ in range(model.image_tokens):
            logits = model.image_logits(hidden).float()
            if uncond is not None:
                logits_u = model.image_logits(uncond).float()
                logits = logits_u + cfg_scale * (logits - logits_u)
            policy = torch.log_softmax(logits, -1)
            if sample:
                probs = torch.softmax(warp(None, logits), -1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator).to(self.device)[:, 0]
            else:
                token = logits.argmax(-1)
            drawn.append(token)
            logps.append(policy.gather(-1, token[:, None])[:, 0])
            embeds = model.embed_image_tokens(token[:, None])
            hidden = self._extend(embeds)
            if uncond_cache is not None:
                uncond = self._extend(embeds, uncond_cache)
        ids = torch.stack(drawn, 1)  # [1, N]
        pixels = model.decode_image_tokens(ids)
        self.append_tokens([[self.image_end]])
        nfe = model.image_tokens * (2 if cfg_scale != 1.0 else 1)
        logprobs = torch.stack(logps, 1) if sample else None
        return ImageSample(pixels, ids, torch.empty(0), logprobs, nfe, noise_level, cfg_scale)
