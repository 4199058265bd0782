"""The settings of `RLModule`, grouped by what they govern, each group checking itself when built
(so a bad value stops the run at once, with the key that holds it): the loss (`Objective`), the
advantages (`Advantages`), the replay of sampled steps and the ODE anchor (`Replay`) and how
rollouts are seeded (`Seeding`). In a config they are nested under the RL module's `init_args`:

    objective: {image_weight: 3000, kl_text: 0.01}
    seeding: {by: prompt}

and on the command line: `--model.init_args.objective.kl_text 0.02`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avr.rollout import SHARED_NOISE, rollout_seed


@dataclass(frozen=True)
class Objective:
    """What an update minimises: PPO-clip on each kind of sampled action (text tokens, SDE steps)
    with a KL to the reference, the kinds weighted, `ppo_epochs` updates per rollout batch.

    Attributes:
        clip_eps: PPO clip range of the text and image ratios.
        kl_text: β of the text KL term (k3 estimator, to the reference).
        kl_image: β of the image KL term.
        text_weight: weight of the text term (GRPO on sampled tokens); 0 trains the image
            generator alone (a diagnostic).
        image_weight: weight of the image term (Flow-GRPO on SDE steps, or a discrete backbone's
            image tokens). An SDE step's log-prob is a mean over the latent's dimensions (as
            Flow-GRPO's), so its gradient is far smaller than a text token's: where text and
            image share every weight (the tiny model) the image term's gradient norm measured
            0.0022 against the text term's 1.42 on a rollout batch of `rl.yaml` at weight 1, and
            Adam then follows the text alone. Separate experts (BAGEL's) keep separate Adam
            statistics and hardly need it.
        ppo_epochs: optimizer steps per rollout batch; later ones reuse it with the sampling-time
            log-probs as π_old, so the clip acts. The rollouts sample in float32; under
            `bf16-mixed` the replay's log-probs differ from theirs by bf16's error (up to about
            0.5 nats on a rare token), which later epochs' ratios carry: train ppo_epochs > 1
            with `--trainer.precision 32-true`.
    """

    clip_eps: float = 0.2
    kl_text: float = 0.01
    kl_image: float = 0.01
    text_weight: float = 1.0
    image_weight: float = 1.0
    ppo_epochs: int = 1

    def __post_init__(self) -> None:
        if self.clip_eps <= 0 or self.kl_text < 0 or self.kl_image < 0:
            raise ValueError(
                "objective: clip_eps must be > 0 and kl_text, kl_image ≥ 0, got "
                f"{self.clip_eps}, {self.kl_text}, {self.kl_image}"
            )
        text, image = self.text_weight, self.image_weight
        if text < 0 or image < 0 or text + image == 0:
            raise ValueError(
                "objective: text_weight and image_weight must be ≥ 0 and not both 0, got "
                f"{text} and {image}"
            )
        if self.ppo_epochs < 1:
            raise ValueError(f"objective.ppo_epochs must be ≥ 1, got {self.ppo_epochs}")


@dataclass(frozen=True)
class Advantages:
    """Group-relative advantages (`avr.grpo.group_advantages`).

    Attributes:
        scale_std: divide group advantages by the group's standard deviation.
        clip: clip advantages to ± this.
        image_rewards_only: the generator's advantages come from the rewards that judge images
            (`Reward.judges_images`), the text's from the whole composite, each group-normalised,
            so a text-only reward does not move the generator (False: both from the composite).
    """

    scale_std: bool = True
    clip: float = 5.0
    image_rewards_only: bool = True

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"advantages.clip must be > 0, got {self.clip}")


@dataclass(frozen=True)
class Replay:
    """Which sampled steps an update replays, the anchor on the rest, the packed row length.

    Attributes:
        sde_window: the SDE steps `[first, last)` a training step trains (default: all, or
            `sampling.sde_window`).
        steps_per_image: how many of the window's steps each image trains per update, each as a
            Gaussian policy step (a noisy block after the image's context, which all its steps
            share; None: every step, as Flow-GRPO; k: k steps drawn at random). Time and
            activation memory grow with it.
        ode_anchor: weight of the anchor on the denoising steps an update does not train (the
            ODE steps of a mixed sampler, `sampling.sde_window`): the mean squared difference
            between the policy's and the reference's velocity at `anchor_steps` of them per
            image, drawn at random. The weights are shared across time, so Flow-GRPO on the first
            steps also moves the last ones, which no reward term trains: on the tiny model they
            drifted into a speckled background that the verifier cannot see. 0: no anchor.
        anchor_steps: untrained steps replayed per image for the anchor (each one more noisy
            block in the replay).
        max_len: packed row length of the training forward pass.
    """

    sde_window: tuple[int, int] | None = None
    steps_per_image: int | None = None
    ode_anchor: float = 0.0
    anchor_steps: int = 1
    max_len: int = 2048

    def __post_init__(self) -> None:
        window = self.sde_window
        if window is not None and not 0 <= window[0] < window[1]:
            raise ValueError(
                f"replay.sde_window must be [first, last) with 0 ≤ first < last, got {list(window)}"
            )
        if self.steps_per_image is not None and self.steps_per_image < 1:
            raise ValueError(
                "replay.steps_per_image must be ≥ 1 or null (every step), got "
                f"{self.steps_per_image}"
            )
        if self.ode_anchor < 0 or self.anchor_steps < 1:
            raise ValueError(
                "replay: ode_anchor must be ≥ 0 and anchor_steps ≥ 1, got "
                f"{self.ode_anchor} and {self.anchor_steps}"
            )
        if self.max_len < 1:
            raise ValueError(f"replay.max_len must be ≥ 1, got {self.max_len}")

    def steps(self, rng: np.random.Generator, total: int) -> list[int]:
        """The SDE steps of an image of `total` steps this update trains: the window's, every one
        or `steps_per_image` drawn from `rng`."""
        first, last = self.sde_window or (0, total)
        window = np.arange(max(0, first), min(total, last))
        k = self.steps_per_image
        return list(window if k is None else rng.choice(window, min(k, len(window)), False))

    def anchors(self, rng: np.random.Generator, total: int, trained) -> list[int]:
        """`anchor_steps` of the steps not in `trained`, drawn from `rng`."""
        rest = np.setdiff1d(np.arange(total), np.asarray(trained, dtype=int))
        return list(rng.choice(rest, min(self.anchor_steps, len(rest)), False))


@dataclass(frozen=True)
class Seeding:
    """How RL seeds its rollouts, by `avr.rollout.rollout_seed` (as every caller does).

    Attributes:
        by: what keys a rollout besides the base seed, its prompt's place in the batch and its
            sample index: `step` (the training step: new draws every step) or `prompt` (a
            digest of the prompt's text, not the step: every pass over a fixed training set,
            `data.cycle`, rolls a prompt out from the same text draws and noise, so the reward's
            change between passes is the policy's, not the sampler's: common random numbers).
        shared_noise: the rollouts of a group start each image from the same noise (their text
            and SDE noise still differ), so rewards within a group differ by what the policy's
            stochastic choices did, not by where the sampler started.
    """

    by: str = "step"  # checked below, for a one-line error naming the key
    shared_noise: bool = False

    def __post_init__(self) -> None:
        if self.by not in ("step", "prompt"):
            raise ValueError(f"seeding.by: expected 'step' or 'prompt', got {self.by!r}")

    def seeds(self, seed: int, stream: int, prompt: int, sample: int) -> tuple[int, int | None]:
        """The seed of sample `sample` of the batch's prompt `prompt`, and its starting noise's
        seed (None: from its own seed). `stream`: the step, or the prompt's digest."""
        noise = rollout_seed(seed, prompt, SHARED_NOISE, stream) if self.shared_noise else None
        return rollout_seed(seed, prompt, sample, stream), noise
