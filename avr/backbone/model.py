"""`UnifiedModel`: one transformer that reads and writes text and images.

Three parts around a Hugging Face causal LM (a Llama-family decoder: Qwen2 by default):

- generation: a latent codec, `latent_in` (BAGEL's vae2llm) + timestep + 2-D position embeddings
  in, `velocity_out` (llm2vae) out (a velocity, or x₀ turned into one); optionally a generation
  expert (Mixture-of-Transformers: separate q/k/v/o, norms and MLP per layer for generation
  tokens);
- understanding: a SigLIP vision encoder and an MLP connector into the LM's embedding space;
- the layer loop below, which runs the LM's own modules with the packed mask and a KV cache.

The loop, not the LM's `forward`, is what lets noisy copies, bidirectional image blocks, per-token
experts and cached denoising share one set of weights.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import AutoencoderKL
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from avr import flow
from avr.backbone import files, replay, rope
from avr.backbone.attention import TrajectoryAttention
from avr.backbone.codec import LatentCodec, PixelCodec, VaeCodec
from avr.backbone.config import UnifiedConfig
from avr.backbone.generation import Session
from avr.backbone.loss import UnifiedLoss
from avr.backbone.packing import (
    GEN,
    LATENT,
    READ,
    FlowSettings,
    ImageGeometry,
    PackedBatch,
    Packer,
)
from avr.backbone.protocol import register_backbone
from avr.backbone.records import KVCache, UnifiedOutput

__all__ = ["KVCache", "UnifiedModel", "UnifiedOutput", "require_unified"]


@register_backbone
class UnifiedModel(nn.Module):
    """The unified model; build with `UnifiedModel(config, tokenizer)` (seed first for a
    reproducible random init) or `avr.backbone.io.from_pretrained(dir)`. A `Backbone`."""

    kind = "unified"
    session_rows = None  # sessions hold any number of sequences

    def __init__(self, config: UnifiedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.lm = _build_lm(config, len(tokenizer))
        lm_config = self.lm.config
        width = lm_config.hidden_size
        self.num_heads = lm_config.num_attention_heads
        self.num_kv_heads = lm_config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(lm_config, "head_dim", None) or width // self.num_heads
        if config.qk_norm:
            _add_qk_norms(self.decoder, self.head_dim, getattr(lm_config, "rms_norm_eps", 1e-6))
        self.codec = _build_codec(config)
        self.latent_in = nn.Linear(self.codec.token_dim, width)
        self.velocity_out = nn.Linear(width, self.codec.token_dim)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, width)
        grid = self.codec.grid
        if config.latent_pos_side is None:
            pos = get_2d_sincos_pos_embed(width, grid, output_type="pt")
            self.register_buffer("latent_pos", pos.float(), persistent=False)  # [N, D]
        else:
            self.latent_pos_embed = PositionTable(width, config.latent_pos_side)
            ids = _grid_ids(grid, config.latent_pos_side, "latent_pos_side")
            self.register_buffer("latent_pos_ids", ids, persistent=False)
        side = config.vision_pos_side
        vision_patch = config.vision.get("patch_size", 16)
        vision_config = SiglipVisionConfig(
            **{
                **config.vision,
                # NaViT positions: SigLIP's table covers side × side patches
                "image_size": side * vision_patch if side else config.image_size,
                "vision_use_head": False,
            }
        )
        self.vision = SiglipVisionModel(vision_config)
        self.connector = nn.Sequential(
            nn.Linear(vision_config.hidden_size, width),
            ACT2FN[config.connector_act],
            nn.Linear(width, width),
        )
        read_grid = config.image_size // vision_patch
        if side is not None:
            self.vision_pos_embed = PositionTable(width, side)
            ids = _grid_ids(read_grid, side, "vision_pos_side")
            self.register_buffer("vision_pos_ids", ids, persistent=False)
        self.gen_layers = (
            nn.ModuleList(copy.deepcopy(layer) for layer in self.decoder.layers)
            if config.generation_expert
            else None
        )
        self.gen_norm = copy.deepcopy(self.decoder.norm) if config.generation_expert else None
        patches = read_grid**2
        self.geometry = ImageGeometry(
            config.image_size,
            self.codec.tokens,
            patches,
            self.codec.token_dim,
            latent_context=config.image_context in ("latent", "both"),
            vit_context=config.image_context in ("vit", "both"),
        )
        self.activation_checkpointing = False
        """Recompute each decoder layer in the backward pass instead of keeping its activations
        (training only; set by the Lightning modules' `activation_checkpointing`)."""
        self.flow_settings = FlowSettings(
            config.timestep_mean, config.timestep_std, config.timestep_shift, config.cfg_dropout
        )

    @property
    def decoder(self) -> nn.Module:
        """The LM's decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`)."""
        return self.lm.model

    def session(self, batch_size: int = 1, cache: bool = True):
        """Incremental generation over a growing interleaved context (`Session`)."""
        return Session(self, batch_size, cache=cache)

    # ---- the Backbone protocol (training and files) ------------------------------------------

    def packer(self, max_len: int):
        """Trajectories → packed batches of `max_len` tokens per row (`Packer`)."""
        return Packer(self.tokenizer, self.geometry, max_len, self.flow_settings)

    def sft_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`UnifiedLoss` of the config (CE on text targets + flow loss on images)."""
        loss, stats = UnifiedLoss.for_model(self.config)(self(batch))
        return loss, {**stats, "tokens": torch.tensor(float(batch.tokens))}

    def policy_terms(self, trajectories, reference, plan) -> dict:
        """RL's replay of rollouts: packed text tokens and Flow-GRPO SDE steps
        (`avr.backbone.replay`)."""
        return replay.policy_terms(self, trajectories, reference, plan)

    def rl_passes(self, trajectories, plan) -> list:
        """The packed replays `policy_terms` runs, with each one's SDE-step records."""
        return replay.rl_passes(self, trajectories, plan)

    def checkpoint_config(self) -> dict:
        """The config with the LM's (and VAE's) full configs inlined (`portable_config`)."""
        return files.portable_config(self)

    @classmethod
    def from_checkpoint_config(cls, config: dict, tokenizer) -> UnifiedModel:
        return cls(UnifiedConfig.from_dict(config), tokenizer)

    def save_pretrained(self, directory):
        """`avr.backbone.files.save_pretrained`: config.json, model.safetensors, tokenizer/."""
        return files.save_pretrained(self, directory)

    # ---- embeddings -------------------------------------------------------------------------

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy latent tokens `[M, N, D_tok]` at times `t` `[M]` → `[M, N, D]`."""
        expected = (self.geometry.gen_tokens, self.geometry.token_dim)
        if tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"expected latent tokens [M, {expected[0]}, {expected[1]}], got {list(x_t.shape)}"
            )
        scaled = t * self.config.timestep_scale
        time = self.time_embed(self.time_proj(scaled).to(x_t.dtype))  # [M, D]
        return self.latent_in(x_t) + time[:, None] + self.latent_positions().to(x_t.dtype)

    def embed_clean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `[K, 3, H, W]` in [0, 1] as a clean latent copy: their codec tokens embedded at
        t = 0 with the generation tokens' positions → `[K, N, D]`."""
        pixels = pixels.to(self.decoder.embed_tokens.weight.dtype)  # the model's one dtype
        tokens = self.codec.to_tokens(self.codec.encode(pixels))
        time = torch.zeros(tokens.shape[0], device=tokens.device, dtype=tokens.dtype)
        return self.embed_latents(tokens, time)

    def latent_positions(self) -> torch.Tensor:
        """Position embeddings of one image's generation tokens `[N, D]`, row-major."""
        if self.config.latent_pos_side is None:
            return self.latent_pos
        return self.latent_pos_embed(self.latent_pos_ids)

    def velocity(self, hidden: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The image head: hidden states of the noisy tokens `[M, N, D]` at times `t` `[M]` →
        velocity `[M, N, D_tok]`, read directly or derived from an x₀ prediction (see
        `UnifiedConfig.prediction`)."""
        out = self.velocity_out(hidden)
        if self.config.prediction == "velocity":
            return out
        t = t.to(out.dtype).clamp(min=self.config.x0_min_t).reshape(-1, 1, 1)
        return (x_t.to(out.dtype) - out) / t

    def unconditional_velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity of noisy latent tokens `[M, N, D_tok]` at times `t` `[M]` seeing only
        each other (no context: the branch CFG dropout trains), for classifier-free guidance."""
        embeds = self.embed_latents(x_t, t)
        batch, length = embeds.shape[:2]
        position = torch.zeros(batch, length, dtype=torch.long, device=embeds.device)
        position = self.copy_positions(position)
        is_gen = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=embeds.device)
        return self.velocity(self.run_layers(embeds, position, is_gen, mask=mask), x_t, t)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the tokenizer's vocabulary (rows a pretrained core pads its
        embedding with are never predicted)."""
        return self.lm.lm_head(hidden)[..., : len(self.tokenizer)]

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `[K, 3, H, W]` in [0, 1] read through the vision encoder → `[K, P, D]`."""
        self.codec.check_pixels(pixels)
        if self.config.vision_pos_side is None:
            hidden = self.vision(pixel_values=pixels * 2 - 1).last_hidden_state
            return self.connector(hidden)
        # NaViT positions: SigLIP's pieces run by hand with the extrapolated position ids
        reader = self.vision
        embed = reader.embeddings.patch_embedding
        patches = embed(pixels.to(embed.weight.dtype) * 2 - 1)
        ids = self.vision_pos_ids
        x = rearrange(patches, "k d h w -> k (h w) d") + reader.embeddings.position_embedding(ids)
        hidden = reader.post_layernorm(reader.encoder(inputs_embeds=x).last_hidden_state)
        return self.connector(hidden) + self.vision_pos_embed(ids).to(hidden.dtype)

    # ---- positions --------------------------------------------------------------------------

    def copy_positions(self, position: torch.Tensor) -> torch.Tensor:
        """The RoPE positions of the tokens of one image copy per row (a latent or a vision
        copy) at sequence positions `[B, L]`: their grid cells in latent-grid units
        (`avr.backbone.rope.image_grid`) where `image_rope` is `grid`, else `position` itself."""
        if self.config.image_rope == "sequence":
            return position
        batch, length = position.shape
        cells = rope.image_grid(length, self.geometry.gen_tokens).to(position.device)
        return self.rope_positions(position, cells[None].expand(batch, length, 2))

    def rope_positions(self, position: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        """The RoPE positions `run_layers` takes for sequence positions `[B, L]` and grid cells
        `[B, L, 2]` (`avr.backbone.rope.rope_positions` for this model's `image_rope`)."""
        return rope.rope_positions(self.config.image_rope, position, grid)

    # ---- the layer loop ---------------------------------------------------------------------

    def run_layers(
        self,
        x: torch.Tensor,
        position: torch.Tensor,
        is_gen: torch.Tensor,
        mask: torch.Tensor | TrajectoryAttention | None = None,
        block_mask=None,
        cache: KVCache | None = None,
        store: bool = False,
    ) -> torch.Tensor:
        """Run the decoder over `x` `[B, L, D]` at RoPE positions `position` (`[B, L]`, or
        `[3, B, L]` from `rope_positions`); returns final-norm hidden states.

        Attention: `block_mask` (FlexAttention), `mask` `[B, 1, L, L_cache + L]` (SDPA) over the
        cached keys followed by this step's, or `mask` a `TrajectoryAttention` (training, no
        cache). With `store`, this step's keys/values are appended to `cache` (prefill,
        decoding); without, the cache is only read (denoising steps). With
        `activation_checkpointing` (training, no cache), each layer is recomputed in the backward
        pass.
        """
        cos, sin = rope.rotary(self.decoder.rotary_emb, x, position)
        use_expert = self.gen_layers is not None and bool(is_gen.any())
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(len(self.decoder.layers)):
            args = (i, x, cos, sin, is_gen, use_expert, mask, block_mask, cache, store)
            if recompute and cache is None:
                x = torch.utils.checkpoint.checkpoint(self._layer, *args, use_reentrant=False)
            else:
                x = self._layer(*args)
        return _routed(self.decoder.norm, self.gen_norm if use_expert else None, x, is_gen)

    def _layer(self, i, x, cos, sin, is_gen, use_expert, mask, block_mask, cache, store):
        """Decoder layer `i` (with its generation expert twin) over `x`."""
        layer = self.decoder.layers[i]
        expert = self.gen_layers[i] if use_expert else None
        attn, expert_attn = layer.self_attn, expert.self_attn if expert else None
        h = _routed(layer.input_layernorm, expert and expert.input_layernorm, x, is_gen)

        def project(name: str) -> torch.Tensor:
            return _routed(
                getattr(attn, name), expert_attn and getattr(expert_attn, name), h, is_gen
            )

        q = self._heads(project("q_proj"), attn, "q_norm", expert_attn, is_gen)
        k = self._heads(project("k_proj"), attn, "k_norm", expert_attn, is_gen)
        v = rearrange(project("v_proj"), "b l (h d) -> b h l d", d=self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None and cache.length:
            keys = torch.cat([cache.keys[i], k], dim=2)
            values = torch.cat([cache.values[i], v], dim=2)
        else:
            keys, values = k, v
        if store:
            if cache is None:
                raise ValueError("store=True needs a cache")
            if len(cache.keys) > i:
                cache.keys[i], cache.values[i] = keys, values
            else:
                cache.keys.append(keys)
                cache.values.append(values)
        out = self._attend(q, keys, values, mask, block_mask)
        out = rearrange(out, "b h l d -> b l (h d)")
        x = x + _routed(attn.o_proj, expert_attn and expert_attn.o_proj, out, is_gen)
        h = _routed(
            layer.post_attention_layernorm, expert and expert.post_attention_layernorm, x, is_gen
        )
        return x + _routed(layer.mlp, expert and expert.mlp, h, is_gen)

    def _heads(self, projected, attn, norm_name, expert_attn, is_gen):
        heads = rearrange(projected, "b l (h d) -> b h l d", d=self.head_dim)
        norm = getattr(attn, norm_name, None)  # Qwen3-style per-head q/k norms
        if norm is None:
            return heads
        expert_norm = getattr(expert_attn, norm_name, None) if expert_attn is not None else None
        routed = _routed(norm, expert_norm, rearrange(heads, "b h l d -> b l h d"), is_gen)
        return rearrange(routed, "b l h d -> b h l d")

    def _attend(self, q, k, v, mask, block_mask):
        gqa = self.num_kv_heads != self.num_heads
        if isinstance(mask, TrajectoryAttention):
            return mask(q, k, v, enable_gqa=gqa)
        if block_mask is not None:
            # Compiled on CUDA (a fused kernel); eager elsewhere, which materializes the scores.
            kernel = _compiled_flex() if q.is_cuda else flex_attention
            return kernel(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def attention_kernel(self, device: torch.device) -> str:
        """How training attention runs on `device`: `flex`, `trajectory` or `sdpa` (see
        `UnifiedConfig.attention`)."""
        if self.config.attention == "auto":
            return "flex" if device.type == "cuda" else "trajectory"
        return self.config.attention

    # ---- training forward -------------------------------------------------------------------

    def forward(self, batch: PackedBatch) -> UnifiedOutput:
        """Packed rows → CE logits at the labelled positions and velocities of the noisy copies."""
        length = batch.token_type.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(
                f"a packed row of {length} tokens exceeds max_seq_len {self.config.max_seq_len}"
            )
        x = self.decoder.embed_tokens(batch.input_ids)  # [R, L, D]
        if batch.gen_xt is not None:  # RL: the sampled noisy states themselves
            x_t = x0 = batch.gen_xt.to(x.dtype)
        else:
            x0 = self.codec.to_tokens(self.codec.encode(batch.gen_pixels.to(x.dtype)))  # [M, N, D]
            x_t = flow.noise(x0, batch.gen_noise.to(x.dtype), batch.gen_t.to(x.dtype))
        gen_mask, read_mask = batch.token_type == GEN, batch.token_type == READ
        clean_mask = batch.token_type == LATENT
        if x0.shape[0]:
            x = x.masked_scatter(
                gen_mask[..., None], self.embed_latents(x_t, batch.gen_t).to(x.dtype)
            )
        if batch.read_pixels.shape[0]:
            x = x.masked_scatter(
                read_mask[..., None], self.embed_images(batch.read_pixels).to(x.dtype)
            )
        if batch.clean_pixels is not None and batch.clean_pixels.shape[0]:
            x = x.masked_scatter(
                clean_mask[..., None], self.embed_clean(batch.clean_pixels).to(x.dtype)
            )
        latent = gen_mask | clean_mask  # codec tokens, noisy or clean: the generation expert's
        position = self.rope_positions(batch.position, batch.grid)
        kernel = self.attention_kernel(x.device)
        if kernel == "flex":
            rows, _ = batch.token_type.shape
            block_mask = create_block_mask(
                batch.mask_mod(), rows, None, length, length, device=x.device
            )
            hidden = self.run_layers(x, position, latent, block_mask=block_mask)
        elif kernel == "trajectory":
            mask = TrajectoryAttention.of(batch)
            hidden = self.run_layers(x, position, latent, mask=mask)
        else:
            hidden = self.run_layers(x, position, latent, mask=batch.attention_mask())
        labelled = batch.labels != -100  # text positions, and the last clean token before </img>
        logits = self.logits(hidden[labelled])
        velocity = (
            self.velocity(hidden[gen_mask].reshape(*x_t.shape[:2], -1), x_t, batch.gen_t)
            if x0.shape[0]
            else x0
        )
        return UnifiedOutput(
            logits=logits,
            labels=batch.labels[labelled],
            label_sample=batch.sample[labelled],
            velocity=velocity,
            target=batch.gen_noise - x0,
            image_sample=batch.gen_sample,
            image_t=batch.gen_t,
        )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _routed(
    module: nn.Module, expert: nn.Module | None, x: torch.Tensor, is_gen: torch.Tensor
) -> torch.Tensor:
    """Apply `module` to every token, or, with a generation expert, `expert` to generation tokens
    (`is_gen`, `[B, L]`) and `module` to the rest. Token-wise modules only."""
    if expert is None:
        return module(x)
    out_und = module(x[~is_gen])
    out_gen = expert(x[is_gen])
    out = out_und.new_empty((*is_gen.shape, *out_und.shape[1:]))
    out[~is_gen] = out_und
    out[is_gen] = out_gen
    return out


def _add_qk_norms(decoder: nn.Module, head_dim: int, eps: float) -> None:
    """Give every attention layer per-head `q_norm`/`k_norm` of the decoder's own RMSNorm class
    (the layer loop applies them; the LM's own forward is never used)."""
    for layer in decoder.layers:
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is None:
            norm = type(layer.input_layernorm)
            attn.q_norm, attn.k_norm = norm(head_dim, eps=eps), norm(head_dim, eps=eps)


class PositionTable(nn.Module):
    """A frozen 2-D sin-cos table of `side²` positions `pos_embed` `[side², D]`, saved with the
    weights and read by index (a module, so sharded training gathers it like any weight)."""

    def __init__(self, width: int, side: int) -> None:
        super().__init__()
        table = get_2d_sincos_pos_embed(width, side, output_type="pt").float()
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


def _grid_ids(grid: int, side: int, key: str) -> torch.Tensor:
    """Entries of a `side²` table that a `grid × grid` image reads, row-major."""
    if grid > side:
        raise ValueError(f"config key {key!r}: {side} is smaller than the image's grid of {grid}")
    rows = torch.arange(grid)
    return (rows[:, None] * side + rows[None, :]).flatten()


def _build_lm(config: UnifiedConfig, vocab_size: int) -> nn.Module:
    if config.lm_path is not None:
        lm = AutoModelForCausalLM.from_pretrained(
            config.lm_path, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
        )
        if lm.get_input_embeddings().num_embeddings < vocab_size:
            lm.resize_token_embeddings(vocab_size)
        return lm
    # A pretrained core may pad its vocabulary past the tokenizer (Qwen2: 152,064 rows)
    vocab_size = max(vocab_size, int(config.lm.get("vocab_size") or 0))
    lm_config = AutoConfig.for_model(**{**config.lm, "vocab_size": vocab_size})
    # float32 like every other part, whatever the config's `torch_dtype` says (loaders cast the
    # whole model to the dtype asked for afterwards)
    return AutoModelForCausalLM.from_config(
        lm_config, attn_implementation="sdpa", dtype=torch.float32
    )


def _build_codec(config: UnifiedConfig) -> LatentCodec:
    if config.codec == "pixel":
        return PixelCodec(config.image_size, config.patch_size, config.latent_channels_last)
    if config.vae_path is not None:
        vae = AutoencoderKL.from_pretrained(config.vae_path, local_files_only=True)
    elif config.vae is not None:
        vae = AutoencoderKL.from_config(config.vae)
    else:
        raise ValueError("config key 'vae': codec 'vae' needs a 'vae' config or a 'vae_path'")
    return VaeCodec(vae, config.image_size, config.patch_size, config.latent_channels_last)


def require_unified(model, what: str) -> None:
    """A diagnostic built on `UnifiedModel`'s internals (its continuous latents, packed forward
    and config) refuses any other backbone at once, naming itself, instead of failing deep."""
    if not isinstance(model, UnifiedModel):
        raise TypeError(
            f"{what} needs a UnifiedModel (continuous image latents, BAGEL's layout); "
            f"got {type(model).__name__}"
        )
