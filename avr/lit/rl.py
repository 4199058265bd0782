"""`RLModule`: GRPO on text tokens and Flow-GRPO on denoising steps, from an exported SFT model.

One training step reads as the algorithm (formulas in `avr.grpo`):

    rollouts   = G rollouts per prompt through the configured mode (SDE sampling, log-probs kept)
    rewards    = Σ weight · reward(rollouts)                    (each component logged on its own)
    advantages = group-relative, clipped
    loss       = PPO-clip(text tokens) + Flow-GRPO(the SDE steps of each image) + KL to the reference

Rollouts are seeded by `(seed, step, prompt, sample)` (or, with `rollout_seeds: prompt`, by the
prompt's text instead of the step), so a resumed run repeats them exactly. A
step whose rewards, advantages or loss are not finite is skipped, counted and logged; after
`max_bad_steps` in a row the run stops with an error (the last good checkpoint stays).
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from avr.backbone.lora import adapters_disabled
from avr.backbone.protocol import ReplayPlan
from avr.grpo import PolicyLoss, behaviour_correction, group_advantages
from avr.lit.base import BackboneModule, ModelSettings
from avr.policy import SamplingConfig
from avr.protocol import Mode
from avr.registry import MODES, REWARDS
from avr.reward import CompositeReward, RewardTerm, Rollouts
from avr.rollout import Job, episode_seed, rollout
from avr.world import PromptSpec, complexity
from avr.world.complexity import LEVELS


class RLModule(BackboneModule):
    """RL of the unified model on ShapeWorld prompts (see the module docstring)."""

    def __init__(
        self,
        model: ModelSettings | None = None,
        seed: int = 0,
        mode: str | Mode = "adaptive",
        rewards: dict[str, RewardTerm] | None = None,
        group_size: int = 4,
        sampling: SamplingConfig | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        clip_eps: float = 0.2,
        kl_text: float = 0.01,
        kl_image: float = 0.01,
        scale_std: bool = True,
        advantage_clip: float = 5.0,
        sde_window: tuple[int, int] | None = None,
        steps_per_image: int | None = None,
        ode_anchor: float = 0.0,
        anchor_steps: int = 1,
        shared_noise: bool = False,
        rollout_seeds: Literal["step", "prompt"] = "step",
        rollout_batch: int = 32,
        image_rewards_only: bool = True,
        ppo_epochs: int = 1,
        text_weight: float = 1.0,
        image_weight: float = 1.0,
        max_len: int = 2048,
        max_bad_steps: int = 5,
    ) -> None:
        """With LoRA and nothing else trainable (`model.lora.trainable` empty), the reference is
        the policy with its adapters off (no copy).

        Args:
            model: the model to train (folder, config overrides, LoRA, activation checkpointing);
                None: the tiny model at random init, for tests.
            seed: seeds the rollouts (with step, prompt and sample) and a random-init model.
            mode: a registered mode name or a `Mode`.
            rewards: `{name: {reward, weight}}`; default: the compositional verifier, weight 1.
            group_size: rollouts per prompt (advantages are relative to the group); ≥ 2.
            sampling: rollout sampling; its `noise_level` must be > 0 (Flow-GRPO needs SDE
                log-probs). With `cfg_scale ≠ 1` the trainer replays the guided velocity, its
                unconditional branch detached (as Flow-GRPO and R3 train with CFG).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay of matrices.
            warmup_steps: linear warmup steps.
            min_lr_ratio: the cosine ends at `min_lr_ratio · lr` (1: constant).
            clip_eps: PPO clip range of the text and image ratios.
            kl_text: β of the text KL term (k3 estimator, to the reference).
            kl_image: β of the image KL term.
            scale_std: divide group advantages by the group's standard deviation.
            advantage_clip: clip advantages to ± this.
            sde_window: the SDE steps `[first, last)` a training step trains (default: all, or
                `sampling.sde_window`).
            steps_per_image: how many of the window's steps each image trains per update, each
                as a Gaussian policy step (a noisy block after the image's context, which all its
                steps share; None: every step, as Flow-GRPO; k: k steps drawn at random). Time and
                activation memory grow with it.
            ode_anchor: weight of the anchor on the denoising steps an update does not train
                (the ODE steps of a mixed sampler, `sampling.sde_window`): the mean squared
                difference between the policy's and the reference's velocity at `anchor_steps`
                of them per image, drawn at random. The weights are shared across time, so
                Flow-GRPO on the first steps also moves the last ones, which no reward term
                trains: on the tiny model they drifted into a speckled background that the
                verifier cannot see. 0: no anchor.
            anchor_steps: untrained steps replayed per image for the anchor (each one more noisy
                block in the replay).
            shared_noise: the rollouts of a group start each image from the same noise (their
                text and SDE noise still differ), so rewards within a group differ by what the
                policy's stochastic choices did, not by where the sampler started.
            rollout_seeds: what seeds a rollout besides `seed` and its sample index: `step`
                (the training step and the prompt's place in the batch: new draws every step) or
                `prompt` (the prompt's text and place, not the step: every pass over a fixed
                training set, `data.cycle`, rolls a prompt out from the same text draws and
                noise, so the reward's change between passes is the policy's, not the sampler's:
                common random numbers).
            rollout_batch: episodes rolled out together (`avr.rollout`); the trajectories do not
                depend on it.
            image_rewards_only: the generator's advantages come from the rewards that judge
                images (`Reward.judges_images`), the text's from the whole composite, each
                group-normalised, so a text-only reward does not move the generator (False: both
                from the composite).
            ppo_epochs: optimizer steps per rollout batch; later ones reuse it with the
                sampling-time log-probs as π_old, so the clip acts. The rollouts sample in
                float32; under `bf16-mixed` the replay's log-probs differ from theirs by bf16's
                error (up to about 0.5 nats on a rare token), which later epochs' ratios carry:
                train ppo_epochs > 1 with `--trainer.precision 32-true`.
            text_weight: weight of the text term (GRPO on sampled tokens) in the loss; 0 trains
                the image generator alone (a diagnostic).
            image_weight: weight of the image term (Flow-GRPO on SDE steps, or a discrete
                backbone's image tokens). An SDE step's log-prob is a mean over the latent's
                dimensions (as Flow-GRPO's), so its gradient is far smaller than a text token's:
                where text and image share every weight (the tiny model) the image term's
                gradient norm measured 0.0022 against the text term's 1.42 on a rollout batch of
                `rl.yaml` at weight 1, and Adam then follows the text alone. Separate experts
                (BAGEL's) keep separate Adam statistics and hardly need it.
            max_len: packed row length of the training forward pass.
            max_bad_steps: non-finite steps in a row before the run stops with an error.
        """
        super().__init__(
            model,
            seed,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.seed = seed
        self.mode = MODES.get(mode)() if isinstance(mode, str) else mode
        if not self.mode.trainable:
            raise ValueError(
                f"model.init_args.mode {self.mode.name!r}: its rollouts hold several contexts, "
                "which RL cannot replay; train the mode its tries are laid out as"
            )
        terms = rewards or {"compositional": RewardTerm(REWARDS.get("compositional")(), 1.0)}
        self.rewards = CompositeReward(terms)
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(
                "group_size must be an integer of at least 2 (advantages are relative to the "
                f"group), got {group_size}"
            )
        if sde_window is not None and not 0 <= sde_window[0] < sde_window[1]:
            raise ValueError(
                f"sde_window must be [first, last) with 0 ≤ first < last, got {list(sde_window)}"
            )
        if rollout_batch < 1:
            raise ValueError(f"rollout_batch must be ≥ 1, got {rollout_batch}")
        self.group_size, self.rollout_batch = group_size, rollout_batch
        self.shared_noise = shared_noise
        if rollout_seeds not in ("step", "prompt"):
            raise ValueError(f"rollout_seeds: expected 'step' or 'prompt', got {rollout_seeds!r}")
        self.rollout_seeds = rollout_seeds
        self.image_rewards_only = image_rewards_only
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be ≥ 1, got {ppo_epochs}")
        self.ppo_epochs = ppo_epochs
        if text_weight < 0 or image_weight < 0 or text_weight + image_weight == 0:
            raise ValueError(
                f"text_weight and image_weight must be ≥ 0 and not both 0, got {text_weight} "
                f"and {image_weight}"
            )
        self.weights = {"text": text_weight, "image": image_weight}
        self._batch: tuple | None = None  # the rollout batch being trained on, and its scores
        self._epochs_done = 0
        self.sampling = sampling or SamplingConfig(noise_level=0.7, max_text_tokens=64, steps=10)
        if self.sampling.noise_level <= 0:
            raise ValueError(
                "sampling.noise_level must be > 0 for RL: Flow-GRPO needs the SDE's log-probs"
            )
        self.text_loss, self.image_loss = (
            PolicyLoss(clip_eps, kl_text),
            PolicyLoss(clip_eps, kl_image),
        )
        self.scale_std, self.advantage_clip = scale_std, advantage_clip
        if sde_window is None and self.sampling.sde_window is not None:
            sde_window = tuple(self.sampling.sde_window)  # train the steps that were stochastic
        if sde_window is not None and self.sampling.sde_window is not None:
            first, last = self.sampling.sde_window
            if not first <= sde_window[0] < sde_window[1] <= last:
                raise ValueError(
                    f"sde_window {list(sde_window)} trains steps that sampling.sde_window "
                    f"{[first, last]} draws with the ODE (no log-prob to train)"
                )
        if steps_per_image is not None and steps_per_image < 1:
            raise ValueError(
                f"steps_per_image must be ≥ 1 or null (every step), got {steps_per_image}"
            )
        self.sde_window, self.steps_per_image = sde_window, steps_per_image
        if ode_anchor < 0 or anchor_steps < 1:
            raise ValueError(
                f"ode_anchor must be ≥ 0 and anchor_steps ≥ 1, got {ode_anchor} and {anchor_steps}"
            )
        self.ode_anchor, self.anchor_steps = ode_anchor, anchor_steps
        self.max_len, self.max_bad_steps = max_len, max_bad_steps
        self.reference = (
            None
            if self.lora is not None and not self.lora.trainable
            else copy.deepcopy(self.backbone).requires_grad_(False).eval()
        )
        self.bad_in_a_row = 0
        self.skipped = 0
        # The modes a rollout can take: an adaptive mode's choices, else the mode itself (more
        # are added as they show up: a user's mode may pick its own).
        self._modes_seen: set[str] = set(getattr(self.mode, "choices", ()) or (self.mode.name,))

    def state_dict(self, *args, **kwargs):
        """The policy only: the frozen reference is the starting model, rebuilt, not saved."""
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("reference.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k: v for k, v in super().state_dict().items() if k.startswith("reference.")}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)

    # ---- the algorithm ----------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.reference is not None:  # frozen and in eval mode on purpose: not worth a warning
            warnings.filterwarnings(
                "ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning
            )

    def training_step(self, prompts: list[PromptSpec], batch_idx: int) -> torch.Tensor | None:
        if self._batch is None or self._epochs_done >= self.ppo_epochs:
            self._batch = self._sample(prompts)  # a fresh rollout batch, scored
            self._epochs_done = 0
        # (else: another update on the last rollouts; this step's prompts are not used)
        trajectories, groups, rewards, parts, advantages, image_advantages, (rolled, scored) = (
            self._batch
        )
        on_policy = self._epochs_done == 0
        self._epochs_done += 1
        if not on_policy:
            rolled, scored = 0.0, 0.0  # no rollout or scoring this step
        update_start = time.perf_counter()
        loss, stats = self.policy_loss(trajectories, advantages, image_advantages, on_policy)
        stats["ppo_epoch"] = torch.tensor(float(self._epochs_done - 1))
        finite = bool(
            torch.isfinite(rewards).all()
            and torch.isfinite(advantages).all()
            and torch.isfinite(image_advantages).all()
            and torch.isfinite(loss)
        )
        if not finite:
            self.skipped += 1
            self._epochs_done = self.ppo_epochs  # never reuse a batch that could not be trained on
        self._log_step(
            trajectories,
            groups,
            rewards,
            parts,
            loss,
            stats,
            (rolled, scored, time.perf_counter() - update_start),
        )
        if not finite:
            return self._skip("non-finite reward, advantage or loss")
        self.bad_in_a_row = 0
        return loss

    def _sample(self, prompts: list[PromptSpec]) -> tuple:
        """Roll out `prompts`, score them, and compute text and image advantages."""
        start = time.perf_counter()
        trajectories, specs, groups = self.rollout(prompts)
        rolled = time.perf_counter()
        rollouts = Rollouts(trajectories, specs, groups)
        rewards, parts = self.rewards.score_parts(rollouts)  # [B]
        advantages = group_advantages(rewards, groups, self.scale_std, self.advantage_clip)  # [B]
        image_rewards = self.rewards.image_total(parts) if self.image_rewards_only else rewards
        image_advantages = (
            torch.zeros_like(advantages)  # nothing judges images: the generator is not moved
            if image_rewards is None
            else group_advantages(image_rewards, groups, self.scale_std, self.advantage_clip)
        )
        if image_rewards is not None:
            parts = {**parts, "images": image_rewards}  # logged as train/reward/images
        seconds = (rolled - start, time.perf_counter() - rolled)
        return trajectories, groups, rewards, parts, advantages, image_advantages, seconds

    @torch.no_grad()
    def rollout(self, prompts: list[PromptSpec]) -> tuple[list, list[PromptSpec], list[int]]:
        """`group_size` rollouts of each prompt with the current policy (eval mode, SDE), in the
        model's own precision whatever the trainer's: under `bf16-mixed` only the update runs in
        bf16, and the samples and their recorded log-probs are the float32 path's."""
        self.backbone.eval()
        keys = [self._rollout_key(spec) for spec in prompts]
        jobs = [
            Job(
                self.mode,
                spec,
                episode_seed(self.seed, key, p, g),
                episode_seed(self.seed, key, p, 2**21) if self.shared_noise else None,
            )
            for p, (spec, key) in enumerate(zip(prompts, keys, strict=True))
            for g in range(self.group_size)
        ]
        device = next(self.backbone.parameters()).device.type
        with torch.autocast(device, enabled=False):
            trajectories = rollout(self.backbone, jobs, self.sampling, self.rollout_batch)
        for job, trajectory in zip(jobs, trajectories, strict=True):
            trajectory.meta.update(spec=job.spec.to_json(), level=complexity(job.spec).level)
        specs = [job.spec for job in jobs]
        groups = [p for p in range(len(prompts)) for _ in range(self.group_size)]
        self.backbone.train()
        return trajectories, specs, groups

    def _rollout_key(self, spec: PromptSpec) -> int:
        """The step, or (`rollout_seeds: prompt`) a 32-bit digest of the prompt's text."""
        if self.rollout_seeds == "step":
            return self.global_step
        return int.from_bytes(hashlib.blake2b(spec.prompt.encode(), digest_size=4).digest(), "big")

    @torch.no_grad()
    def _reference(self, run: Callable):
        """`run(model)` on the reference: the frozen copy, or the policy without its adapters."""
        if self.reference is not None:
            return run(self.reference)
        with adapters_disabled(self.backbone):
            return run(self.backbone)

    def policy_loss(
        self,
        trajectories: list,
        advantages: torch.Tensor,
        image_advantages: torch.Tensor | None = None,
        on_policy: bool = True,
    ) -> tuple[torch.Tensor, dict]:
        """PPO-clip on every kind of sampled action the backbone replays (`policy_terms`: text
        tokens; SDE steps of each generated image, or a discrete backbone's image tokens), each
        with its own clip/KL settings and advantages. `on_policy`: the policy is the one that
        sampled, so π_old is its own detached log-prob (ρ = 1 exactly); else (a later PPO epoch)
        π_old is what the sampler recorded. Where a text token was drawn from another behaviour
        distribution μ (an explored mode token), μ replaces π_old."""
        image_advantages = advantages if image_advantages is None else image_advantages
        terms = self.backbone.policy_terms(trajectories, self._reference, self._replay_plan())
        if self.ode_anchor and "image" in terms and terms["image"].anchor is None:
            raise ValueError(
                f"ode_anchor: {type(self.backbone).__name__} replays no denoising steps to "
                "anchor (a continuous-latent backbone such as UnifiedModel does); set ode_anchor: 0"
            )
        total, stats = 0.0, {}
        for kind, term in terms.items():
            loss_fn, adv, weight = (
                (self.text_loss, advantages, self.weights["text"])
                if kind == "text"
                else (self.image_loss, image_advantages, self.weights["image"])
            )
            logp = term.logp
            old = logp.detach() if on_policy or term.recorded is None else term.recorded.to(logp)
            if kind == "text":
                old = old + behaviour_correction(trajectories, term.sample.tolist()).to(logp)
            loss, kind_stats = loss_fn(
                logp, old, adv.to(logp)[term.sample.to(logp.device)], term.kl
            )
            total = total + weight * loss
            stats |= {f"{kind}/{k}": v for k, v in kind_stats.items()}
            stats[f"{kind}/loss"] = loss.detach()
            if term.anchor is not None and self.ode_anchor:
                anchor = term.anchor.mean() if term.anchor.numel() else term.anchor.sum()
                total = total + self.ode_anchor * anchor
                stats[f"{kind}/anchor"] = anchor.detach()
            stats[f"{kind}/{term.unit}"] = torch.tensor(float(logp.numel()))
            if logp.numel() and term.recorded is not None:  # sampling (cached) vs replay: ~0
                gap = (term.recorded - logp.detach().float().cpu()).abs().max()
                stats[f"{kind}/logprob_gap"] = gap
        return total, stats

    def _replay_plan(self) -> ReplayPlan:
        """The sampler's settings and this update's choice of SDE steps: the window's (every
        one, or `steps_per_image` drawn at random, seeded by the step), and with `ode_anchor`
        the untrained steps each image replays for the anchor (drawn from the same stream)."""
        rng = np.random.default_rng([self.seed, self.global_step, 2**20])

        def sde_steps(total: int) -> list[int]:
            first, last = self.sde_window or (0, total)
            window = np.arange(max(0, first), min(total, last))
            k = self.steps_per_image
            return list(window if k is None else rng.choice(window, min(k, len(window)), False))

        def anchor_steps(total: int, trained) -> list[int]:
            rest = np.setdiff1d(np.arange(total), np.asarray(trained, dtype=int))
            return list(rng.choice(rest, min(self.anchor_steps, len(rest)), False))

        return ReplayPlan(
            temperature=self.sampling.temperature or 1.0,
            noise_level=self.sampling.noise_level,
            cfg_scale=self.sampling.cfg_scale,
            max_len=self.max_len,
            sde_steps=sde_steps,
            anchor_steps=anchor_steps if self.ode_anchor else None,
        )

    # ---- helpers ----------------------------------------------------------------------------

    def _skip(self, why: str) -> None:
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_a_row} training steps in a row were skipped ({why}); stopping. "
                "The last good checkpoint is kept."
            )
        return None

    def _log_step(self, trajectories, groups, rewards, parts, loss, stats, seconds) -> None:
        self.log("train/reward", rewards.nanmean(), prog_bar=True)
        for name, values in parts.items():
            if not torch.isnan(values).all():
                self.log(f"train/reward/{name}", values.nanmean())
        self.log("train/loss", loss.detach())
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/skipped_steps", float(self.skipped))  # every step, 0 included
        for name, value in stats.items():
            self.log(f"train/{name}", value)
        for name, value in zip(("rollout", "reward", "update"), seconds, strict=True):
            self.log(f"train/time/{name}", value)
        if seconds[0] > 0:  # a step that rolled out (not a later PPO epoch)
            self.log("train/rollouts_per_s", len(trajectories) / seconds[0])
        self.log("train/nfe", float(np.mean([t.meta.get("nfe", 0) for t in trajectories])))
        self.log(
            "train/text_tokens",
            float(np.mean([t.meta.get("text_tokens", 0) for t in trajectories])),
        )
        # Rollouts per (level, mode) this step, every cell logged every step (0 included), so a
        # level that did not occur reads 0 rather than its last value.
        counts = Counter((t.meta["level"], t.meta["mode"]) for t in trajectories)
        self._modes_seen.update(mode for _, mode in counts)
        for level in LEVELS:
            for mode in sorted(self._modes_seen):
                self.log(f"train/mode/{level}/{mode}", float(counts[level, mode]))
        # The intra-group complexity penalty compares modes within a group: it can act only in
        # groups whose rollouts took at least two modes.
        modes_per_group: dict[int, set[str]] = {}
        for group, trajectory in zip(groups, trajectories, strict=True):
            modes_per_group.setdefault(group, set()).add(trajectory.meta["mode"])
        mixed = sum(len(m) >= 2 for m in modes_per_group.values())
        self.log("train/mixed_mode_groups", mixed / max(len(modes_per_group), 1))
