"""`RLModule`: GRPO on text tokens and Flow-GRPO on denoising steps, from an exported SFT model.

One training step reads as the algorithm (formulas in `avr.lit.grpo`):

    rollouts   = G rollouts per prompt through the configured mode (SDE sampling, log-probs kept)
    rewards    = Σ weight · reward(rollouts)                    (each component logged on its own)
    advantages = group-relative, clipped
    loss       = PPO-clip(text tokens) + Flow-GRPO(the SDE steps of each image) + KL to the reference

Rollouts are seeded by `(seed, step, prompt, sample)`, so a resumed run repeats them exactly. A
step whose rewards, advantages or loss are not finite is skipped, counted and logged; after
`max_bad_steps` in a row the run stops with an error (the last good checkpoint stays).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from avr.backbone.lora import adapters_disabled
from avr.backbone.packing import pack, token_count
from avr.lit.base import BackboneModule, ModelSettings
from avr.lit.grpo import PolicyLoss, SdeStep, group_advantages, image_terms, k3
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
        shared_noise: bool = False,
        rollout_batch: int = 32,
        image_rewards_only: bool = True,
        ppo_epochs: int = 1,
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
            shared_noise: the rollouts of a group start each image from the same noise (their
                text and SDE noise still differ), so rewards within a group differ by what the
                policy's stochastic choices did, not by where the sampler started.
            rollout_batch: episodes rolled out together (`avr.rollout`); the trajectories do not
                depend on it.
            image_rewards_only: the generator's advantages come from the rewards that judge
                images (`Reward.judges_images`), the text's from the whole composite, each
                group-normalised, so a text-only reward does not move the generator (False: both
                from the composite).
            ppo_epochs: optimizer steps per rollout batch; later ones reuse it with the
                sampling-time log-probs as π_old, so the clip acts.
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
        terms = rewards or {"compositional": RewardTerm(REWARDS.get("compositional")(), 1.0)}
        self.rewards = CompositeReward(terms)
        if group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (advantages are relative to the group), got {group_size}"
            )
        if sde_window is not None and not 0 <= sde_window[0] < sde_window[1]:
            raise ValueError(
                f"sde_window must be [first, last) with 0 ≤ first < last, got {list(sde_window)}"
            )
        if rollout_batch < 1:
            raise ValueError(f"rollout_batch must be ≥ 1, got {rollout_batch}")
        self.group_size, self.rollout_batch = group_size, rollout_batch
        self.shared_noise = shared_noise
        self.image_rewards_only = image_rewards_only
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be ≥ 1, got {ppo_epochs}")
        self.ppo_epochs = ppo_epochs
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
        """`group_size` rollouts of each prompt with the current policy (eval mode, SDE)."""
        self.backbone.eval()
        step = self.global_step
        jobs = [
            Job(
                self.mode,
                spec,
                episode_seed(self.seed, step, p, g),
                episode_seed(self.seed, step, p, 2**21) if self.shared_noise else None,
            )
            for p, spec in enumerate(prompts)
            for g in range(self.group_size)
        ]
        trajectories = rollout(self.backbone, jobs, self.sampling, self.rollout_batch)
        for job, trajectory in zip(jobs, trajectories, strict=True):
            trajectory.meta.update(spec=job.spec.to_json(), level=complexity(job.spec).level)
        specs = [job.spec for job in jobs]
        groups = [p for p in range(len(prompts)) for _ in range(self.group_size)]
        self.backbone.train()
        return trajectories, specs, groups

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
        """PPO-clip on the sampled text tokens + Flow-GRPO on the SDE steps of each generated
        image (`steps_per_image`), all of an image's steps in one replay of its context where a
        row holds them (a discrete-token backbone: PPO-clip on its sampled image tokens instead). `on_policy`:
        the policy is the one that sampled, so π_old is its own detached log-prob (ρ = 1 exactly);
        else (a later PPO epoch) π_old is what the sampler recorded."""
        image_advantages = advantages if image_advantages is None else image_advantages
        if self.backbone.kind != "unified":
            return self._token_policy_loss(trajectories, advantages, image_advantages, on_policy)
        passes = self._rl_batches(trajectories)
        batch, _ = passes[0]
        out = self.backbone(batch)
        ref = self._reference(lambda model: model(batch))
        temperature = self.sampling.temperature or 1.0
        logp = torch.log_softmax(out.logits.float() / temperature, -1).gather(
            -1, out.labels[:, None]
        )[:, 0]  # [T]
        logp_ref = torch.log_softmax(ref.logits.float() / temperature, -1).gather(
            -1, ref.labels[:, None]
        )[:, 0]
        rollout_logp = _sampled_logprobs(trajectories, out.label_sample.tolist())
        # The first update of a rollout batch: π_old is the policy that just sampled, so ρ = 1
        # exactly; a later PPO epoch: π_old is what the sampler recorded. Where a token was drawn
        # from another behaviour distribution μ (an explored mode token), μ replaces π_old.
        sampled = logp.detach() if on_policy else rollout_logp.to(logp)
        correction = _behaviour_correction(trajectories, out.label_sample.tolist()).to(logp)
        old = sampled + correction
        text_loss, text_stats = self.text_loss(
            logp, old, advantages[out.label_sample], k3(logp, logp_ref)
        )
        stats = {f"text/{k}": v for k, v in text_stats.items()}
        stats["text/tokens"] = torch.tensor(float(logp.numel()))
        if logp.numel():  # sampling (cached, incremental) vs training (packed) forward: ~0
            stats["text/logprob_gap"] = (rollout_logp - logp.detach().cpu()).abs().max()
        # The image loss is the mean over every trained (image, step), however split in replays.
        image_loss, per_pass, trained = 0.0, [], sum(len(steps) for _, steps in passes)
        for i, (batch, steps) in enumerate(passes):
            if i:
                out = self.backbone(batch)
                ref = self._reference(lambda model, b=batch: model(b))
            loss, pass_stats = self._image_step_loss(
                batch, steps, out.velocity, ref.velocity, image_advantages, on_policy
            )
            image_loss = image_loss + loss * len(steps) / max(trained, 1)
            per_pass.append(pass_stats)
        for key in per_pass[0]:
            values = torch.stack([p[key] for p in per_pass])
            stats[f"image/{key}"] = values.max() if key == "logprob_gap" else values.mean()
        stats["image/steps_trained"] = torch.tensor(float(trained))
        return text_loss + image_loss, stats

    def _image_step_loss(self, batch, steps, velocity, velocity_ref, advantages, on_policy):
        """Flow-GRPO's loss over one replayed SDE step per image, with its statistics. With CFG
        the policy's and the reference's velocities are guided by their own unconditional
        velocity (detached)."""
        scale = self.sampling.cfg_scale
        if scale != 1.0 and steps:
            t = batch.gen_t.to(batch.gen_xt)
            with torch.no_grad():
                v_u = self.backbone.unconditional_velocity(batch.gen_xt, t)
                v_u_ref = self._reference(lambda m: m.unconditional_velocity(batch.gen_xt, t))
            velocity = v_u + scale * (velocity - v_u)
            velocity_ref = v_u_ref + scale * (velocity_ref - v_u_ref)
        image_logp, image_kl = image_terms(
            batch.gen_xt, velocity, velocity_ref, steps, self.sampling.noise_level
        )
        recorded = [s.logprob for s in steps]
        image_old = (
            image_logp.detach()
            if on_policy or None in recorded
            else torch.tensor(recorded, dtype=image_logp.dtype, device=image_logp.device)
        )
        loss, stats = self.image_loss(image_logp, image_old, advantages[batch.gen_sample], image_kl)
        if recorded and None not in recorded:  # the sampler's step log-probs vs the trainer's
            gap = torch.tensor(recorded) - image_logp.detach().float().cpu()
            stats["logprob_gap"] = gap.abs().max()
        return loss, stats

    def _token_policy_loss(
        self,
        trajectories: list,
        advantages: torch.Tensor,
        image_advantages: torch.Tensor,
        on_policy: bool = True,
    ) -> tuple[torch.Tensor, dict]:
        """GRPO over every sampled token, text and image alike, each trajectory replayed in one
        teacher-forced pass (`JanusBackbone.replay`)."""
        temperature = self.sampling.temperature or 1.0
        parts: dict[str, dict[str, list]] = {
            kind: {"logp": [], "ref": [], "adv": [], "old": []} for kind in ("text", "image")
        }
        for b, trajectory in enumerate(trajectories):
            mine = self.backbone.replay(trajectory, temperature)
            ref = self._reference(lambda model, t=trajectory: model.replay(t, temperature))
            for kind, part in parts.items():
                part["logp"].append(mine[kind])
                part["ref"].append(ref[kind])
                adv = image_advantages if kind == "image" else advantages
                part["adv"].append(adv[b].expand(mine[kind].shape[0]))
                part["old"].append(mine[f"{kind}_rollout"])
        total, stats = 0.0, {}
        for kind, loss_fn in (("text", self.text_loss), ("image", self.image_loss)):
            part = {k: torch.cat(v) for k, v in parts[kind].items()}
            logp = part["logp"]
            old = logp.detach() if on_policy else part["old"].to(logp)
            loss, kind_stats = loss_fn(logp, old, part["adv"].to(logp), k3(logp, part["ref"]))
            total = total + loss
            stats |= {f"{kind}/{k}": v for k, v in kind_stats.items()}
            stats[f"{kind}/tokens"] = torch.tensor(float(logp.numel()))
            if logp.numel():  # sampling (cached, incremental) vs replay (one pass): ~0
                gap = (part["old"] - logp.detach().cpu()).abs().max()
                stats[f"{kind}/logprob_gap"] = gap
        return total, stats

    # ---- helpers ----------------------------------------------------------------------------

    def _rl_batches(self, trajectories: list) -> list[tuple]:
        """The packed replays of `trajectories` with each generated image's trained SDE steps
        (every step of `sde_window`, or `steps_per_image` of them drawn at random) as noisy
        blocks after its context (`pack(states=…)`), and their records (`SdeStep`) in the batch's
        image order. Usually one replay; the steps are split over several where one row of
        `max_len` tokens cannot hold them all."""
        rng = np.random.default_rng([self.seed, self.global_step, 2**20])
        chosen: list[list[tuple]] = []  # per trajectory, per generated image: (sample, [steps])
        for trajectory in trajectories:
            mine = []
            for segment in trajectory.segments:
                if not segment.is_image or segment.sample is None:
                    continue
                total = len(segment.sample.timesteps) - 1
                first, last = self.sde_window or (0, total)
                window = np.arange(max(0, first), min(total, last))
                k = self.steps_per_image
                picked = window if k is None else rng.choice(window, min(k, len(window)), False)
                mine.append((segment.sample, sorted(int(j) for j in picked)))
            chosen.append(mine)
        tok, geometry = self.backbone.tokenizer, self.backbone.geometry
        steps_each = max((len(js) for mine in chosen for _, js in mine), default=1)
        per_replay = steps_each
        for trajectory, mine in zip(trajectories, chosen, strict=True):
            if mine:  # the most steps per image whose blocks fit this trajectory into a row
                room = self.max_len - token_count(trajectory, tok, geometry, rl=True)
                per_replay = min(per_replay, max(1, 1 + room // (geometry.gen_tokens * len(mine))))
        passes = []
        for lo in range(0, steps_each, per_replay):
            states, records = [], []
            for mine in chosen:
                states.append([])
                records.append([])
                for sample, js in mine:
                    states[-1].append([])
                    for j in js[lo : lo + per_replay]:
                        t, t_next = float(sample.timesteps[j]), float(sample.timesteps[j + 1])
                        logp = None if sample.logprobs is None else float(sample.logprobs[0, j])
                        t_max = float(sample.timesteps[1])
                        states[-1][-1].append((sample.latents[j, 0], t))
                        records[-1].append(
                            SdeStep(sample.latents[j + 1, 0], t, t_next, t_max, logp)
                        )
            batch = pack(
                trajectories, tok, geometry, self.max_len, [0] * len(trajectories), rl=True,
                states=states,
            ).to(self.device)  # fmt: skip
            taken: Counter = Counter()
            steps = []
            for b in batch.gen_sample.tolist():  # the batch's image order
                steps.append(records[b][taken[b]])
                taken[b] += 1
            passes.append((batch, steps))
        return passes

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


def _behaviour_correction(trajectories: list, label_sample: list[int]) -> torch.Tensor:
    """Per sampled text token, in label order: `log μ − log π_sampler` where the token was drawn
    from a behaviour distribution μ other than the policy (`segment.behaviour_logprobs`), else 0."""
    return _in_label_order(
        trajectories,
        label_sample,
        lambda s: (
            [mu - lp for mu, lp in zip(s.behaviour_logprobs, s.logprobs, strict=True)]
            if getattr(s, "behaviour_logprobs", None)
            else [0.0] * len(s.logprobs)
        ),
    )


def _sampled_logprobs(trajectories: list, label_sample: list[int]) -> torch.Tensor:
    """The rollouts' own per-token log-probs, in the packed batch's label order."""
    return _in_label_order(trajectories, label_sample, lambda s: s.logprobs)


def _in_label_order(trajectories: list, label_sample: list[int], per_segment) -> torch.Tensor:
    """`per_segment(segment)` (one value per sampled token) over every sampled text segment, in
    the packed batch's label order (rows reorder trajectories; each trajectory's tokens stay
    contiguous and in order)."""
    per_trajectory = {
        b: [v for s in t.segments if not s.is_image and s.logprobs for v in per_segment(s)]
        for b, t in enumerate(trajectories)
    }
    order = list(dict.fromkeys(label_sample))
    return torch.tensor([v for b in order for v in per_trajectory[b]])
