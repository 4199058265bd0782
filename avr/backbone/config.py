"""`UnifiedConfig`: everything that fixes the unified model's shape, as one JSON-able dataclass.

Field docstrings are the `--help` text of the CLI. `from_dict` refuses a key that does not exist,
naming it and the valid ones, so a typo in a YAML or a checkpoint never passes silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from avr.backbone.tokenizer import DEFAULT_MODES


def _tiny_lm() -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def _tiny_vision() -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,  # 16 tokens to read a 64 px image: short trajectories on a CPU
    }


def flux_vae_config(block_out_channels: tuple[int, ...] = (128, 256, 512, 512)) -> dict[str, Any]:
    """`diffusers.AutoencoderKL` config of the FLUX autoencoder (16 latent channels, no quant
    convs, scale 0.3611, shift 0.1159), the one BAGEL generates in; narrower `block_out_channels`
    give a tiny one of the same layout."""
    blocks = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    }


@dataclass
class UnifiedConfig:
    """Shape of a `UnifiedModel`: language core, latent codec, vision encoder, flow settings."""

    lm: dict[str, Any] = field(default_factory=_tiny_lm)
    """Language core config as `transformers.AutoConfig.for_model(**lm)` takes it (needs
    `model_type`; a Llama-family decoder: qwen2, llama, mistral, qwen3). `vocab_size` is at least
    the tokenizer."""
    lm_path: str | None = None
    """Local folder of a pretrained causal LM, loaded offline with `from_pretrained`; overrides `lm`."""
    image_size: int = 64
    """Side of the (square) images the model reads and writes, in pixels."""
    codec: str = "pixel"
    """Latent space of generation: `pixel` (patches of pixels, ShapeWorld) or `vae` (AutoencoderKL)."""
    vae: dict[str, Any] | None = None
    """`diffusers.AutoencoderKL` config for `codec: vae` (random init, e.g. a tiny test VAE)."""
    vae_path: str | None = None
    """Local folder of a pretrained AutoencoderKL for `codec: vae`; overrides `vae`."""
    patch_size: int = 8
    """Side of one generation token's latent patch (pixels for `pixel`, latent cells for `vae`)."""
    vision: dict[str, Any] = field(default_factory=_tiny_vision)
    """`transformers.SiglipVisionConfig` fields of the understanding encoder (`image_size` is set
    from `image_size`)."""
    generation_expert: bool = False
    """Mixture-of-Transformers: separate per-layer weights (q/k/v/o, norms, MLP) for generation
    tokens, as BAGEL does."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys in every attention layer (BAGEL's Qwen2 has it; a
    Qwen3 language core brings its own and ignores this)."""
    connector_act: str = "gelu"
    """Activation between the connector's two linear layers (a `transformers` ACT2FN name;
    BAGEL: `gelu_pytorch_tanh`)."""
    vision_pos_side: int | None = None
    """BAGEL's reader ("NaViT" positions): the SigLIP position table holds `side²` entries, a patch
    at row h, column w reads entry `h·side + w`, and a frozen 2-D sin-cos table of the LM's width
    (`vit_pos_embed`) is added after the connector. None: SigLIP's own table for `image_size`."""
    latent_pos_side: int | None = None
    """Side of a frozen 2-D sin-cos table of latent positions saved with the weights (BAGEL's
    `max_latent_size`); a token at row h, column w reads entry `h·side + w`. None: a table of
    exactly the image's grid, computed, not saved."""
    latent_channels_last: bool = False
    """Order of values inside one generation token: `(p, q, c)` (BAGEL's patchify) instead of
    `(c, p, q)`."""
    timestep_scale: float = 1000.0
    """`t ∈ [0, 1]` is multiplied by this before the sinusoidal timestep embedding (diffusers and
    SD3: 1000; BAGEL: 1)."""
    image_context: str = "both"
    """How an image that later tokens read (an input, a draft, a sketch, a refined image) sits in
    the context: `vit` (vision-encoder tokens: understanding), `latent` (its codec tokens at t = 0,
    the clean copy later generation attends to, so an edit can copy what was right) or `both`, as
    BAGEL does (latent copy first, then the vision copy)."""
    modes: tuple[str, ...] = DEFAULT_MODES
    """Modes the tokenizer has a `<mode:…>` token for (the adaptive policy's choices)."""
    ce_weight: float = 1.0
    """λ_CE in `loss = λ_CE · CE(text) + MSE(velocity)`."""
    timestep_mean: float = 0.0
    """Mean of the logit-normal training timestep distribution."""
    timestep_std: float = 1.0
    """Std of the logit-normal training timestep distribution."""
    timestep_shift: float = 1.0
    """Shift `s` applied to sampled timesteps, `t ← s·t / (1 + (s − 1)·t)` (> 1: noisier)."""
    prediction: str = "x0"
    """What the image head outputs: `x0` (the clean latent; the velocity is derived as
    `(x_t − x̂₀) / max(t, min_t)`, which is what pixel-space models with large patches need, Li &
    He 2025, "Back to Basics: Let Denoising Generative Models Denoise") or `velocity` (BAGEL, SD3).
    The loss is the velocity MSE either way."""
    image_loss: str = "velocity"
    """Where the image loss is measured: `velocity` (MSE of the velocity, weighting an x₀ error by
    1/t²) or `x0` (MSE of the implied clean image, equal weight at every t)."""
    x0_min_t: float = 0.05
    """Floor on `t` when an x₀ prediction is turned into a velocity (`prediction: x0`)."""
    cfg_dropout: float = 0.1
    """Probability that a generated image is trained without its context (for classifier-free
    guidance)."""
    max_seq_len: int = 2048
    """Longest packed row, in tokens."""
    image_rope: str = "sequence"
    """RoPE positions of image tokens: `sequence` (BAGEL: every token of an image copy at the
    image's one sequence position) or `grid` (the rotary frequencies split three ways, interleaved:
    one third rotates by the sequence position, the others by the token's row and column in the
    latent grid; text tokens use their sequence position on all three, which is exactly 1-D RoPE).
    With `grid`, a token of a later image and the token at the same place of an earlier one differ
    only on the sequence axis, so attending to "the same place in the image before" (copying what
    an edit keeps) is a content-independent pattern; with `sequence` that match rests on the
    absolute position embedding alone. Measured on the copy rung of the ladder (docs/results.md, "Can the
    model edit?"): from the text→image weights, 250 steps, `grid` copies more closely than
    `sequence`."""
    attention: str = "auto"
    """Training attention over packed rows: `flex` (FlexAttention block masks), `trajectory` (SDPA
    one trajectory at a time, `avr.backbone.attention`), `sdpa` (one dense boolean mask per row)
    or `auto` (flex on CUDA; trajectory elsewhere, where PyTorch's FlexAttention has no
    backward)."""

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        _check_scalar_types(self)
        if self.codec not in ("pixel", "vae"):
            raise ValueError(f"config key 'codec': expected 'pixel' or 'vae', got {self.codec!r}")
        if self.attention not in ("auto", "flex", "trajectory", "sdpa"):
            raise ValueError(
                "config key 'attention': expected 'auto', 'flex', 'trajectory' or 'sdpa', "
                f"got {self.attention!r}"
            )
        if self.image_context not in ("vit", "latent", "both"):
            raise ValueError(
                "config key 'image_context': expected 'vit', 'latent' or 'both', "
                f"got {self.image_context!r}"
            )
        if self.image_rope not in ("sequence", "grid"):
            raise ValueError(
                f"config key 'image_rope': expected 'sequence' or 'grid', got {self.image_rope!r}"
            )
        if self.image_loss not in ("x0", "velocity"):
            raise ValueError(
                f"config key 'image_loss': expected 'velocity' or 'x0', got {self.image_loss!r}"
            )
        if self.prediction not in ("x0", "velocity"):
            raise ValueError(
                f"config key 'prediction': expected 'x0' or 'velocity', got {self.prediction!r}"
            )
        if self.codec == "pixel" and self.image_size % self.patch_size:
            raise ValueError(
                f"config key 'patch_size': {self.patch_size} does not divide image_size {self.image_size}"
            )
        for key in ("vision_pos_side", "latent_pos_side"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"config key {key!r}: expected a positive side or null")
        if "model_type" not in self.lm and self.lm_path is None:
            raise ValueError("config key 'lm': needs 'model_type' (e.g. 'qwen2') or set 'lm_path'")
        if "model_type" in self.lm:
            _check_lm_keys(self.lm)

    @classmethod
    def qwen2_0_5b(cls, **overrides: Any) -> UnifiedConfig:
        """The 0.5B class: Qwen2-0.5B's decoder shape (random init unless `lm_path` is given), a
        SigLIP-base-sized reader and a 16-channel VAE with 2×2 latent patches on 256 px images."""
        lm = {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        }
        vision = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "patch_size": 16,
        }
        vae = {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 16,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
        }
        base = {
            "lm": lm,
            "vision": vision,
            "codec": "vae",
            "vae": vae,
            "patch_size": 2,
            "image_size": 256,
            "max_seq_len": 8192,
            "prediction": "velocity",
        }
        return cls(**{**base, **overrides})

    @classmethod
    def bagel_7b(cls, **overrides: Any) -> UnifiedConfig:
        """BAGEL-7B-MoT's shape (random init; `avr.backbone.bagel.from_bagel` loads the published
        weights): Qwen2.5-7B layers with QK-norm and a generation expert, a SigLIP-so400m reader
        (26 layers, NaViT positions up to 70 patches a side), the 16-channel FLUX autoencoder with
        2×2 latent patches (latent positions up to 64 a side)."""
        lm = {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
        }
        vision = {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        }
        base = {
            "lm": lm,
            "vision": vision,
            "codec": "vae",
            "vae": flux_vae_config(),
            "patch_size": 2,
            "image_size": 512,
            "max_seq_len": 16384,
            "prediction": "velocity",
            "generation_expert": True,
            "qk_norm": True,
            "connector_act": "gelu_pytorch_tanh",
            "vision_pos_side": 70,
            "latent_pos_side": 64,
            "latent_channels_last": True,
            "timestep_scale": 1.0,
            "image_context": "both",
        }
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        out["modes"] = list(self.modes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnifiedConfig:
        """Build from a dict, refusing unknown keys with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise ValueError(
                f"unknown config key {unknown[0]!r}; expected one of {', '.join(valid)}"
            )
        return cls(**data)


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_scalar_types(config: UnifiedConfig) -> None:
    """A scalar field of the wrong type (`image_size: "sixty-four"`) is an error naming the key."""
    for f in dataclasses.fields(config):
        kinds = str(f.type).replace(" ", "").split("|")
        allowed = tuple(t for kind in kinds for t in _SCALARS.get(kind, ()))
        if not allowed or not all(k in (*_SCALARS, "None") for k in kinds):
            continue  # not a plain scalar field
        value = getattr(config, f.name)
        if value is None and "None" in kinds:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise ValueError(f"config key {f.name!r}: expected {' or '.join(kinds)}, got {value!r}")


def _check_lm_keys(lm: dict[str, Any]) -> None:
    """Keys of the `lm` dict that its transformers config class does not define are errors (the
    config class would keep them silently, and the model would not be the one asked for)."""
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING

    model_type = lm["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config key 'lm': unknown model_type {model_type!r}")
    config_class = CONFIG_MAPPING[model_type]
    # What the class defines, takes, or folds into its rope parameters (`rope_theta` in
    # transformers 5); any other key would only be stored as an unused attribute.
    valid = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    valid |= set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    valid |= {"rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype"} & set(lm)
    for key in lm:
        if key not in valid:
            hint = difflib.get_close_matches(key, sorted(valid), n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"config key 'lm': {config_class.__name__} has no key {key!r}{maybe}")
