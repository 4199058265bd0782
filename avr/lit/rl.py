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
from dataclasses import dataclass, replace

import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from avr.backbone.lora import adapters_disabled
from avr.backbone.protocol import ReplayPlan
from avr.grpo import PolicyLoss, behaviour_correction, group_advantages
from avr.lit.base import BackboneModule, ModelSettings
from avr.lit.rl_settings import Advantages, Objective, Replay, Seeding
from avr.machine import release_freed_memory
from avr.policy import SamplingConfig
from avr.protocol import Mode
from avr.registry import MODES, REWARDS
from avr.reward import CompositeReward, RewardTerm, Rollouts
from avr.rollout import Job, replay_rng, rollout
from avr.sequence import Trajectory
from avr.world import PromptSpec, complexity
from avr.world.complexity import LEVELS


@dataclass
class RolloutBatch:
    """One rollout batch and what was computed from it: the trajectories, each one's group (its
    prompt's place), the composite reward and its parts, the text and image advantages, the
    seconds spent rolling out and scoring, and how many updates have used it (`ppo_epochs`)."""

    trajectories: list[Trajectory]
    groups: list[int]
    rewards: torch.Tensor
    parts: dict[str, torch.Tensor]
    advantages: torch.Tensor
    image_advantages: torch.Tensor
    seconds: tuple[float, float]
    updates: int = 0

    @property
    def finite(self) -> bool:
        return bool(
            torch.isfinite(self.rewards).all()
            and torch.isfinite(self.advantages).all()
            and torch.isfinite(self.image_advantages).all()
        )


def _trainable(mode: str | Mode) -> Mode:
    """The mode `mode` names (or is), refused where RL cannot replay its rollouts."""
    mode = MODES.get(mode)() if isinstance(mode, str) else mode
    if not mode.trainable:
        raise ValueError(
            f"model.init_args.mode {mode.name!r}: its rollouts hold several contexts, which RL "
            "cannot replay; train the mode its tries are laid out as"
        )
    return mode


def _check_sizes(group_size: int, rollout_batch: int) -> tuple[int, int]:
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            "group_size must be an integer of at least 2 (advantages are relative to the "
            f"group), got {group_size}"
        )
    if rollout_batch < 1:
        raise ValueError(f"rollout_batch must be ≥ 1, got {rollout_batch}")
    return group_size, rollout_batch


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
        objective: Objective | None = None,
        advantages: Advantages | None = None,
        replay: Replay | None = None,
        seeding: Seeding | None = None,
        rollout_batch: int = 32,
        max_bad_steps: int = 5,
    ) -> None:
        """With LoRA and nothing else trainable (`model.lora.trainable` empty), the reference is
        the policy with its adapters off (no copy).

        Args:
            model: the model to train (folder, config overrides, LoRA, activation checkpointing);
                None: the tiny model at random init, for tests.
            seed: seeds the rollouts (with the step or prompt, the prompt's place and the sample:
                `seeding`) and a random-init model.
            mode: a registered mode name or a `Mode`.
            rewards: `{name: {reward, weight}}`; default: the compositional verifier, weight 1.
            group_size: rollouts per prompt (advantages are relative to the group); ≥ 2.
            sampling: rollout sampling; its `noise_level` must be > 0 (Flow-GRPO needs SDE
                log-probs). With `cfg_scale ≠ 1` the trainer replays the guided velocity, its
                unconditional branch detached (as Flow-GRPO and R3 train with CFG).
            lr, weight_decay, warmup_steps, min_lr_ratio: AdamW's peak rate and the decay of
                its matrices, the linear warmup's steps, the cosine's end as a share of `lr`.
            objective: the loss (`avr.lit.rl_settings.Objective`): clip, KL, weights, epochs.
            advantages: group normalisation and clipping, which rewards move the generator
                (`Advantages`).
            replay: the SDE steps an update trains, the ODE anchor, the packed row length
                (`Replay`).
            seeding: what keys each rollout's seed: the step or the prompt's text, and whether a
                group shares its starting noise (`Seeding`).
            rollout_batch: episodes rolled out together (the trajectories do not depend on it).
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
        self.seed, self.mode = seed, _trainable(mode)
        terms = rewards or {"compositional": RewardTerm(REWARDS.get("compositional")(), 1.0)}
        self.rewards = CompositeReward(terms)
        self.group_size, self.rollout_batch = _check_sizes(group_size, rollout_batch)
        self.objective = objective or Objective()
        self.advantages = advantages or Advantages()
        self.seeding = seeding or Seeding()
        self.sampling = sampling or SamplingConfig(noise_level=0.7, max_text_tokens=64, steps=10)
        if self.sampling.noise_level <= 0:
            raise ValueError(
                "sampling.noise_level must be > 0 for RL: Flow-GRPO needs the SDE's log-probs"
            )
        self.replay = self._check_replay(replay or Replay())
        self.text_loss = PolicyLoss(self.objective.clip_eps, self.objective.kl_text)
        self.image_loss = PolicyLoss(self.objective.clip_eps, self.objective.kl_image)
        self.max_bad_steps = max_bad_steps
        self._batch: RolloutBatch | None = None  # the rollout batch being trained on
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

    def _check_replay(self, replay: Replay) -> Replay:
        """`replay` with its window defaulting to the sampler's (train the steps that were
        stochastic), refused where it trains steps the sampler draws with the ODE."""
        sampled = self.sampling.sde_window
        if replay.sde_window is None and sampled is not None:
            return replace(replay, sde_window=tuple(sampled))
        if replay.sde_window is not None and sampled is not None:
            first, last = sampled
            if not first <= replay.sde_window[0] < replay.sde_window[1] <= last:
                raise ValueError(
                    f"replay.sde_window {list(replay.sde_window)} trains steps that "
                    f"sampling.sde_window {[first, last]} draws with the ODE (no log-prob to train)"
                )
        return replay

    def state_dict(self, *args, **kwargs):
        """The policy only: the frozen reference is the starting model, rebuilt, not saved."""
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("reference.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k: v for k, v in super().state_dict().items() if k.startswith("reference.")}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)

    # ---- the algorithm ----------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        release_freed_memory()  # the update's activations, before the next rollouts

    def on_fit_start(self) -> None:
        if self.reference is not None:  # frozen and in eval mode on purpose: not worth a warning
            warnings.filterwarnings(
                "ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning
            )

    def training_step(self, prompts: list[PromptSpec], batch_idx: int) -> torch.Tensor | None:
        batch = self._batch
        if batch is None or batch.updates >= self.objective.ppo_epochs:
            batch = self._batch = self._sample(prompts)  # rollouts, rewards, advantages
        # (else: another update on the last rollouts; this step's prompts are not used)
        on_policy = batch.updates == 0
        batch.updates += 1
        update_start = time.perf_counter()
        loss, stats = self.policy_loss(
            batch.trajectories, batch.advantages, batch.image_advantages, on_policy
        )
        stats["ppo_epoch"] = torch.tensor(float(batch.updates - 1))
        finite = batch.finite and bool(torch.isfinite(loss))
        if not finite:
            self.skipped += 1
            batch.updates = self.objective.ppo_epochs  # never reuse a batch that failed
        rolled, scored = batch.seconds if on_policy else (0.0, 0.0)  # a later epoch: neither
        self._log_step(batch, loss, stats, (rolled, scored, time.perf_counter() - update_start))
        if not finite:
            return self._skip("non-finite reward, advantage or loss")
        self.bad_in_a_row = 0
        return loss

    def _sample(self, prompts: list[PromptSpec]) -> RolloutBatch:
        """Roll out `prompts`, score them, and compute text and image advantages."""
        start = time.perf_counter()
        trajectories, specs, groups = self.rollout(prompts)
        rolled = time.perf_counter()
        rewards, parts = self.rewards.score_parts(Rollouts(trajectories, specs, groups))  # [B]
        settings = self.advantages
        advantages = group_advantages(rewards, groups, settings.scale_std, settings.clip)  # [B]
        image_rewards = self.rewards.image_total(parts) if settings.image_rewards_only else rewards
        image_advantages = (
            torch.zeros_like(advantages)  # nothing judges images: the generator is not moved
            if image_rewards is None
            else group_advantages(image_rewards, groups, settings.scale_std, settings.clip)
        )
        if image_rewards is not None:
            parts = {**parts, "images": image_rewards}  # logged as train/reward/images
        release_freed_memory()  # the rollouts' caches, before the update allocates its own
        seconds = (rolled - start, time.perf_counter() - rolled)
        return RolloutBatch(
            trajectories, groups, rewards, parts, advantages, image_advantages, seconds
        )

    @torch.no_grad()
    def rollout(self, prompts: list[PromptSpec]) -> tuple[list, list[PromptSpec], list[int]]:
        """`group_size` rollouts of each prompt with the current policy (eval mode, SDE), in the
        model's own precision whatever the trainer's: under `bf16-mixed` only the update runs in
        bf16, and the samples and their recorded log-probs are the float32 path's."""
        self.backbone.eval()
        streams = [self._rollout_stream(spec) for spec in prompts]
        jobs = [
            Job(self.mode, spec, *self.seeding.seeds(self.seed, stream, p, g))
            for p, (spec, stream) in enumerate(zip(prompts, streams, strict=True))
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

    def _rollout_stream(self, spec: PromptSpec) -> int:
        """The step, or (`seeding.by: prompt`) a 32-bit digest of the prompt's text."""
        if self.seeding.by == "step":
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
        if self.replay.ode_anchor and "image" in terms and terms["image"].anchor is None:
            raise ValueError(
                f"replay.ode_anchor: {type(self.backbone).__name__} replays no denoising steps "
                "to anchor (a continuous-latent backbone such as UnifiedModel does); set "
                "ode_anchor: 0"
            )
        total, stats = 0.0, {}
        for kind, term in terms.items():
            loss_fn, adv, weight = (
                (self.text_loss, advantages, self.objective.text_weight)
                if kind == "text"
                else (self.image_loss, image_advantages, self.objective.image_weight)
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
            if term.anchor is not None and self.replay.ode_anchor:
                anchor = term.anchor.mean() if term.anchor.numel() else term.anchor.sum()
                total = total + self.replay.ode_anchor * anchor
                stats[f"{kind}/anchor"] = anchor.detach()
            stats[f"{kind}/{term.unit}"] = torch.tensor(float(logp.numel()))
            if logp.numel() and term.recorded is not None:  # sampling (cached) vs replay: ~0
                gap = (term.recorded - logp.detach().float().cpu()).abs().max()
                stats[f"{kind}/logprob_gap"] = gap
        return total, stats

    def _replay_plan(self) -> ReplayPlan:
        """This update's choice of SDE steps (`Replay.steps`) and, with `ode_anchor`, of the
        untrained steps each image replays for the anchor, both drawn from the step's own stream
        (`avr.rollout.replay_rng`). The sampler's settings come from the rollouts' samples."""
        rng, replay = replay_rng(self.seed, self.global_step), self.replay
        return ReplayPlan(
            max_len=replay.max_len,
            sde_steps=lambda total: replay.steps(rng, total),
            anchor_steps=(
                (lambda total, trained: replay.anchors(rng, total, trained))
                if replay.ode_anchor
                else None
            ),
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

    def _log_step(self, batch: RolloutBatch, loss, stats, seconds) -> None:
        trajectories, groups, rewards, parts = (
            batch.trajectories,
            batch.groups,
            batch.rewards,
            batch.parts,
        )
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
