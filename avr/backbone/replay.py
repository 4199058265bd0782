"""How `UnifiedModel` replays its rollouts for RL (`Backbone.policy_terms`).

Text: one packed, teacher-forced pass over every trajectory gives the log-prob of each sampled
token. Images (Flow-GRPO): each trained SDE step `x_t → x_{t+Δt}` of a generated image is a noisy
block after that image's context (`pack(states=…)`), so all of an image's steps share one replay of
its context; a block is seen only by itself, so it computes exactly that step's velocity. Rows that
cannot hold every block of their trajectory are split over several replays. The untrained steps of
`plan.anchor_steps` ride along as blocks of their own (`AnchorStep`): their velocities, policy's
against reference's, are the anchor that holds what the trained steps' reward does not judge.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from avr.backbone.generation import sampler_settings
from avr.backbone.packing import PackedBatch, pack, token_count
from avr.backbone.protocol import PolicyTerms, ReplayPlan
from avr.grpo import AnchorStep, SdeStep, image_terms, k3, sampled_text_logprobs


def rl_passes(model, trajectories: Sequence, plan: ReplayPlan) -> list[tuple[PackedBatch, list]]:
    """The packed replays of `trajectories` with each generated image's trained SDE steps
    (`plan.sde_steps`, and the untrained ones of `plan.anchor_steps`) as noisy blocks after its
    context, and their records (`SdeStep`, `AnchorStep`) in the batch's image order. Usually one
    replay; the steps are split over several where one row of `plan.max_len` tokens cannot hold
    them all."""
    # per trajectory, per generated image: (sample, [(step, anchored)]): trained steps, then anchors
    chosen: list[list[tuple]] = []
    for trajectory in trajectories:
        mine = []
        for segment in trajectory.segments:
            if not segment.is_image or segment.sample is None:
                continue
            total = len(segment.sample.timesteps) - 1
            picked = range(total) if plan.sde_steps is None else plan.sde_steps(total)
            picked = sorted(int(j) for j in picked)
            anchored = [] if plan.anchor_steps is None else plan.anchor_steps(total, picked)
            steps = [(j, False) for j in picked] + [(int(j), True) for j in sorted(anchored)]
            mine.append((segment.sample, steps))
        chosen.append(mine)
    tok, geometry = model.tokenizer, model.geometry
    steps_each = max((len(js) for mine in chosen for _, js in mine), default=1)
    per_replay = max(steps_each, 1)
    for trajectory, mine in zip(trajectories, chosen, strict=True):
        if mine:  # the most steps per image whose blocks fit this trajectory into a row
            room = plan.max_len - token_count(trajectory, tok, geometry, rl=True)
            per_replay = min(per_replay, max(1, 1 + room // (geometry.gen_tokens * len(mine))))
    device = next(model.parameters()).device
    passes = []
    for lo in range(0, max(steps_each, 1), per_replay):
        states, records = [], []
        for mine in chosen:
            states.append([])
            records.append([])
            for sample, js in mine:
                states[-1].append([])
                for j, anchored in js[lo : lo + per_replay]:
                    if anchored:
                        t = float(sample.timesteps[j])
                        states[-1][-1].append((sample.latents[j, 0], t))
                        records[-1].append(AnchorStep(t))
                        continue
                    t, t_next = float(sample.timesteps[j]), float(sample.timesteps[j + 1])
                    logp = None if sample.logprobs is None else sample.logprobs[0, j]
                    states[-1][-1].append((sample.latents[j, 0], t))
                    records[-1].append(
                        SdeStep(
                            sample.latents[j + 1, 0],
                            t,
                            t_next,
                            float(sample.timesteps[1]),
                            None if logp is None else float(logp),
                        )
                    )
        batch = pack(
            list(trajectories), tok, geometry, plan.max_len, [0] * len(trajectories), rl=True,
            states=states,
        ).to(device)  # fmt: skip
        taken: Counter = Counter()
        steps = []
        for b in batch.gen_sample.tolist():  # the batch's image order
            steps.append(records[b][taken[b]])
            taken[b] += 1
        passes.append((batch, steps))
    return passes


def policy_terms(
    model, trajectories: Sequence, reference: Callable[[Callable], Any], plan: ReplayPlan
) -> dict[str, PolicyTerms]:
    """Text tokens from the first replay; SDE steps from every replay (see the module
    docstring). With CFG the policy's and the reference's velocities are guided by their own
    unconditional velocity (detached), as the sampler guided them."""
    passes = rl_passes(model, trajectories, plan)
    sampled = sampler_settings(trajectories)  # what the sampler used, as its samples recorded it
    image: dict[str, list] = {"logp": [], "kl": [], "sample": [], "recorded": [], "anchor": []}
    for i, (batch, steps) in enumerate(passes):
        out = model(batch)
        ref = reference(lambda m, b=batch: m(b))
        if i == 0:
            text = _text_terms(out, ref, trajectories, sampled.temperature)
        velocity, velocity_ref = out.velocity, ref.velocity
        if sampled.cfg_scale != 1.0 and steps:
            t = batch.gen_t.to(batch.gen_xt)
            with torch.no_grad():
                v_u = model.unconditional_velocity(batch.gen_xt, t)
            v_u_ref = reference(lambda m, b=batch, t=t: m.unconditional_velocity(b.gen_xt, t))
            velocity = v_u + sampled.cfg_scale * (velocity - v_u)
            velocity_ref = v_u_ref + sampled.cfg_scale * (velocity_ref - v_u_ref)
        x_t, sample = batch.gen_xt, batch.gen_sample
        anchored = [k for k, s in enumerate(steps) if isinstance(s, AnchorStep)]
        if anchored:
            gap = velocity[anchored] - velocity_ref[anchored]
            image["anchor"].append(gap.pow(2).flatten(1).mean(-1))
            sde = [k for k, s in enumerate(steps) if isinstance(s, SdeStep)]
            x_t, sample = x_t[sde], sample[sde]
            velocity, velocity_ref = velocity[sde], velocity_ref[sde]
            steps = [steps[k] for k in sde]
        logp, kl = image_terms(x_t, velocity, velocity_ref, steps, sampled.noise_level)
        image["logp"].append(logp)
        image["kl"].append(kl)
        image["sample"].append(sample.cpu())  # one per SDE block, as `steps`
        image["recorded"].extend(s.logprob for s in steps)
    recorded = image["recorded"]
    return {
        "text": text,
        "image": PolicyTerms(
            logp=torch.cat(image["logp"]),
            kl=torch.cat(image["kl"]),
            sample=torch.cat(image["sample"]).long(),
            recorded=None if None in recorded else torch.tensor(recorded, dtype=torch.float32),
            unit="steps_trained",
            anchor=(
                torch.cat(image["anchor"])
                if image["anchor"]
                else None
                if plan.anchor_steps is None
                else torch.zeros(0)  # asked for, but no untrained step to replay
            ),
        ),
    }


def _text_terms(out, ref, trajectories: Sequence, temperature: float) -> PolicyTerms:
    def logp(output) -> torch.Tensor:
        logits = output.logits.float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, output.labels[:, None])[:, 0]  # [T]

    mine, theirs = logp(out), logp(ref)
    sample = out.label_sample.cpu().long()
    return PolicyTerms(
        logp=mine,
        kl=k3(mine, theirs),
        sample=sample,
        recorded=sampled_text_logprobs(trajectories, sample.tolist()),
    )
