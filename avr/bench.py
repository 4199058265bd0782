"""`avr bench NAME [flags]` (`avr bench NAME --help`: the flags it reads): speed measured side by side, the headline figure as the last line.

Benchmarks name the machine they ran on; figures in the README and closing notes come from here,
never from timed tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console

from avr.machine import cpu_bf16, describe
from avr.world import Verifier, degrade, render, sample_scene, sample_specs

BENCHES: dict[str, Callable[[argparse.Namespace, Console], str]] = {}


def bench(fn: Callable[[argparse.Namespace, Console], str]):
    """Register a benchmark under its function name; it returns its headline line."""
    if fn.__name__ in BENCHES:
        raise ValueError(f"benchmark {fn.__name__!r} is already registered")
    BENCHES[fn.__name__] = fn
    return fn


@bench
def verifier(args: argparse.Namespace, console: Console) -> str:
    """Verifier images/s on one core: detection + scoring of ground-truth renders, clean and
    degraded (blur 0.5 px, noise σ = 0.05), over all tags."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    specs = sample_specs(args.n, seed=args.seed)
    images = [
        render(sample_scene(s, np.random.default_rng([args.seed, i])), args.resolution)
        for i, s in enumerate(specs)
    ]
    noisy = [degrade(image, seed=i) for i, image in enumerate(images)]
    check = Verifier()
    rates = {}
    for name, batch in (("clean", images), ("degraded", noisy)):
        start = time.perf_counter()
        correct = sum(
            check.verify(image, spec).correct for image, spec in zip(batch, specs, strict=True)
        )
        seconds = time.perf_counter() - start
        rates[name] = len(batch) / seconds
        console.print(
            f"{name:9s} {len(batch)} images in {seconds:.2f} s: {rates[name]:.0f} images/s, "
            f"agreement {correct / len(batch):.2%}"
        )
    return (
        f"verifier: {rates['clean']:.0f} images/s clean, {rates['degraded']:.0f} degraded "
        f"({args.resolution} px, one core)"
    )


@bench
def rollout(args: argparse.Namespace, console: Console) -> str:
    """Image generation (25 ODE steps, tiny model) with the KV cache vs recomputing the whole
    sequence at every step, after a prompt alone and after a reflect-style context (two images
    read back and a critique)."""
    import torch

    from avr.backbone import Session
    from avr.defaults import tiny_model

    torch.set_num_threads(args.threads)
    model = tiny_model(args.seed).eval()
    specs = sample_specs(2, seed=args.seed)
    drafts = torch.stack(
        [_pixels(render(sample_scene(s, np.random.default_rng(i)))) for i, s in enumerate(specs)]
    )
    ratios = {}
    for context, images in (("prompt", 0), ("reflect", 2), ("plan", 4)):
        seconds = {}
        for cache in (True, False):
            session = Session(model, batch_size=1, cache=cache)
            session.append_text([specs[0].prompt])
            for k in range(images):
                session.append_image(drafts[k % 2 : k % 2 + 1])
                session.append_text(["<refine>make the circle red and move it left</refine>"])
            tokens = session.cache.length
            session.generate_image(steps=1, read=False)  # warm-up
            seconds[cache] = min(
                _time(lambda s=session: s.generate_image(steps=25, read=False))
                for _ in range(args.repeats)
            )
        ratios[context] = seconds[False] / seconds[True]
        console.print(
            f"{context:8s} context {tokens:4d} tokens: cached {seconds[True] * 1000:.0f} ms, "
            f"recompute {seconds[False] * 1000:.0f} ms, {ratios[context]:.1f}x"
        )
    return (
        f"rollout: cached vs recompute {ratios['plan']:.1f}x after a plan context (4 images), "
        f"{ratios['reflect']:.1f}x after 2 images, {ratios['prompt']:.1f}x after a prompt alone"
    )


@bench
def rollouts(args: argparse.Namespace, console: Console) -> str:
    """Rollouts/s of `adaptive` (`--model`; `--prompts` prompts of every level × `--group`
    rollouts, RL's sampling: SDE images, sampled text) through `avr.rollout`, batched vs one at a
    time, side by side; also checks that both give the same trajectories."""
    import torch

    from avr.backbone import from_pretrained
    from avr.policy import SamplingConfig
    from avr.registry import MODES
    from avr.rollout import Job, rollout, rollout_seed
    from avr.world import LEVELS, complexity

    torch.set_num_threads(args.threads)
    model = from_pretrained(args.model).eval()
    pool = sample_specs(40 * args.prompts, seed=args.seed)
    by_level = {lv: [s for s in pool if complexity(s).level == lv] for lv in LEVELS}
    specs = [by_level[LEVELS[i % len(LEVELS)]][i // len(LEVELS)] for i in range(args.prompts)]
    mode = MODES.get("adaptive")()
    jobs = [
        Job(mode, spec, rollout_seed(args.seed, p, g))
        for p, spec in enumerate(specs)
        for g in range(args.group)
    ]
    sampling = SamplingConfig(steps=10, noise_level=0.7, max_text_tokens=64)
    rollout(model, jobs[:2], sampling, max_batch=2)  # warm-up
    rates, results = {}, {}
    for name, batch in (("one at a time", 1), (f"batched ({len(jobs)})", len(jobs))):
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        results[name] = rollout(model, jobs, sampling, max_batch=batch, seconds=seconds)
        rates[name] = len(jobs) / (time.perf_counter() - start)
        split = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(seconds.items()))
        console.print(f"{name:14s} {rates[name]:.2f} rollouts/s ({split})")
    single, batched = results.values()
    gap = max(
        float((a.sample.latents - b.sample.latents).abs().max())
        for x, y in zip(single, batched, strict=True)
        for a, b in zip(x.images, y.images, strict=True)
    )
    same_text = all(
        [s.text for s in x.segments] == [s.text for s in y.segments]
        for x, y in zip(single, batched, strict=True)
    )
    modes = [t.meta["mode"] for t in batched]
    console.print(
        f"modes chosen: {', '.join(f'{m} {modes.count(m)}' for m in sorted(set(modes)))}; "
        f"same text: {same_text}; largest latent difference {gap:.1e}"
    )
    one, many = rates.values()
    return f"rollouts: batched {many:.2f} vs one at a time {one:.2f} rollouts/s, {many / one:.1f}x"


@bench
def packing(args: argparse.Namespace, console: Console) -> str:
    """SFT forward+backward tokens/s on a mixed-length batch (direct, reflect and plan-shaped
    trajectories, a third each): packed rows vs one padded row per trajectory, same model and masks."""
    import torch

    from avr.backbone import UnifiedLoss, pack
    from avr.defaults import tiny_model
    from avr.sequence import Segment, Trajectory

    torch.set_num_threads(args.threads)
    model = tiny_model(args.seed).train()
    loss_fn = UnifiedLoss()
    specs = sample_specs(12, seed=args.seed)
    trajectories = []
    for i, spec in enumerate(specs):
        image = render(sample_scene(spec, np.random.default_rng(i)))
        segments = [Segment.prompt(spec.prompt)]
        if i % 3 == 1:  # reflect-shaped: draft, critique
            segments += [
                Segment(image=image, role="draft"),
                Segment(text="<refine>add a blue square</refine>"),
            ]
        if i % 3 == 2:  # plan-shaped: three steps, each an instruction and a sketch
            for _ in range(3):
                segments += [
                    Segment(text="<ins>add a red circle</ins><des>a red circle</des>"),
                    Segment(image=image, role="sketch"),
                ]
        trajectories.append(Trajectory([*segments, Segment(image=image, role="final")]))
    max_len = args.max_len or _fitting_row(trajectories, model)
    console.print(f"rows of {max_len} tokens")
    rates = {}
    for name, packed in (("packed", True), ("padded", False)):
        batch = pack(trajectories, model.tokenizer, model.geometry, max_len, packed=packed)

        def step(batch=batch):
            model.zero_grad()
            loss, _ = loss_fn(model(batch))
            loss.backward()

        step()  # warm-up
        seconds = min(_time(step) for _ in range(args.repeats))
        rates[name] = batch.tokens / seconds
        console.print(
            f"{name}: {tuple(batch.input_ids.shape)} rows×length, {batch.tokens} tokens, "
            f"{seconds * 1000:.0f} ms/step, {rates[name]:.0f} tokens/s"
        )
    return f"packing: packed vs padded {rates['packed'] / rates['padded']:.2f}x SFT tokens/s"


@bench
def adaptive(args: argparse.Namespace, console: Console) -> str:
    """Accuracy and mean NFE of the adaptive policy vs always planning, side by side on one prompt
    set (`--model`, default the shipped tiny SFT model; `--n` prompts over every tag)."""
    import tempfile
    from pathlib import Path

    import torch

    from avr.backbone import from_pretrained
    from avr.evaluate import evaluate
    from avr.policy import SamplingConfig
    from avr.registry import MODES

    torch.set_num_threads(args.threads)
    model = from_pretrained(args.model)
    specs = sample_specs(args.n, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate(
            {"model": model},
            specs,
            {name: MODES.get(name)() for name in ("adaptive", "plan")},
            Path(out),
            SamplingConfig(steps=25, temperature=0.0),
        )
    rows = {m: (v["overall"], v["per_prompt"]["nfe"]) for m, v in metrics["runs"].items()}
    for mode, (accuracy, nfe) in rows.items():
        console.print(f"{mode:9s} accuracy {accuracy:.1%}, {nfe:.1f} NFE per prompt")
    (acc_a, nfe_a), (acc_p, nfe_p) = rows["adaptive"], rows["plan"]
    return f"adaptive: {acc_a:.1%} at {nfe_a:.0f} NFE vs always-plan {acc_p:.1%} at {nfe_p:.0f} NFE ({nfe_p / max(nfe_a, 1e-9):.2f}x the compute)"


@bench
def memory(args: argparse.Namespace, console: Console) -> str:
    """Per-GPU memory of the training config `--config`: model states under ZeRO-2/3 (DeepSpeed's
    estimators) and activations for its packed row length (see `avr.memory`). A model folder
    that is not here is estimated from `UnifiedConfig.<--preset>()`."""
    from rich.table import Table

    from avr.memory import GIB, estimate, read_training_config

    shape = read_training_config(args.config, args.preset)
    result = estimate(shape)
    counts, act = result["counts"], result["activations"]
    gpus = shape.gpus_per_node * shape.nodes
    console.print(f"config: {args.config}; model shape from {shape.source}")
    console.print(
        f"parameters: {counts.total / 1e9:.2f} B, trainable {counts.trainable / 1e9:.3f} B"
        f"{' (LoRA r=' + str(shape.lora.r) + ')' if shape.lora else ''}, largest layer "
        f"{counts.largest_layer / 1e6:.0f} M; {gpus} GPUs ({shape.nodes} node(s) × "
        f"{shape.gpus_per_node}); configured ZeRO stage: {shape.zero_stage}"
        + ("; RL keeps a frozen reference copy" if shape.reference_copy else "")
    )
    table = Table(title="model states (params, grads, optimizer), DeepSpeed's estimators")
    for column in ("setup", "GiB per GPU", "GiB CPU per node"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for name, gpu, cpu in result["model_states"]:
        table.add_row(name, f"{gpu:.1f}", f"{cpu:.1f}")
    console.print(table)
    checkpointing = "with" if shape.activation_checkpointing else "without"
    console.print(
        f"activations, one packed row of {shape.seq_len} tokens, bf16, {checkpointing} activation "
        f"checkpointing: {act['decoder'] / GIB:.1f} GiB; logits {act['logits_per_1000_text_tokens'] / GIB:.2f} "
        f"GiB per 1,000 text tokens; a dense (SDPA) mask would add "
        f"{act['dense_attention_scores_per_layer'] / GIB:.1f} GiB of scores per layer"
    )
    states = {name: gpu for name, gpu, _ in result["model_states"]}
    return (
        f"memory: {counts.total / 1e9:.1f} B parameters on {gpus} GPUs: model states "
        f"{states['ZeRO-2']:.1f} GiB/GPU under ZeRO-2, {states['ZeRO-3']:.1f} GiB/GPU under ZeRO-3; "
        f"activations {act['decoder'] / GIB:.1f} GiB per {shape.seq_len}-token row"
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fitting_row(trajectories, model) -> int:
    """The shortest of 512, 1024, 2048 … tokens that holds the longest trajectory (the packing
    bench's row length when `--max-len` is not given)."""
    from avr.backbone import pack
    from avr.backbone.packing import TrajectoryTooLong

    max_len = 512
    while True:
        try:
            pack(trajectories, model.tokenizer, model.geometry, max_len, packed=True)
            return max_len
        except TrajectoryTooLong:
            max_len *= 2


def _pixels(image):
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def matmul_peak(dtype, threads: int, side: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of a dense `side`² matmul in `dtype` on `threads` threads: the machine's own peak
    for the work a transformer step is made of, measured in the run that reports against it."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * side**3 * repeats / (time.perf_counter() - start) / 1e9


#: Where a step's time goes, by the operators' names (`torch.profiler`, self CPU time).
OP_KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation", "mkldnn")),
    ("attention", ("attention", "aten::_softmax", "aten::softmax", "flash")),
    ("optimizer", ("Optimizer", "adamw", "_foreach", "aten::addcdiv", "aten::lerp")),
    ("casts and copies", ("aten::to", "aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat")),
)


def profile_shares(step: Callable[[], None]) -> str:
    """Run `step` once under `torch.profiler` and say which kinds of operators took its CPU time
    (matmuls, attention, the optimizer, casts and copies, the remaining elementwise and other ops,
    and the time outside any operator: Python and the autograd engine's own work)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = (time.perf_counter() - start) * 1e6
    spent: dict[str, float] = {kind: 0.0 for kind, _ in OP_KINDS}
    spent["other operators"] = 0.0
    for event in prof.key_averages():
        kind = next(
            (k for k, keys in OP_KINDS if any(key.lower() in event.key.lower() for key in keys)),
            "other operators",
        )
        spent[kind] += event.self_cpu_time_total
    spent["outside operators"] = max(0.0, wall - sum(spent.values()))
    total = sum(spent.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in spent.items())


@bench
def train(args: argparse.Namespace, console: Console) -> str:
    """SFT steps of a shipped model (forward, loss, backward, AdamW) on teacher trajectories of
    every mode: the float32 path with one dense mask per packed row, attention one trajectory at a
    time (the CPU default), and that under bf16 autocast where the CPU has bf16, side by side in
    one run, with images and tokens per second and the achieved GFLOP/s against the machine's
    dense matmul peak."""
    import copy

    import torch

    from avr.backbone import from_pretrained
    from avr.data.teacher import ShapeWorldTeacher
    from avr.registry import MODES

    torch.set_num_threads(args.threads)
    base = from_pretrained(args.model).train()
    specs = sample_specs(args.batch, seed=args.seed)
    modes = ["direct", "reflect", "plan"]
    trajectories = []
    for i, spec in enumerate(specs):
        rng = np.random.default_rng([args.seed, i])
        teacher = ShapeWorldTeacher(sample_scene(spec, rng), rng, base.config.image_size)
        trajectories.append(MODES.get(modes[i % 3])().build(teacher, spec))
    packer = base.packer(args.max_len or 2048)
    batch = packer(trajectories, list(range(len(trajectories))))  # fixed noise and times
    images = sum(1 for t in trajectories for s in t.images if s.loss)
    params = sum(p.numel() for p in base.parameters())
    flops = 6 * params * batch.tokens  # forward and backward, matmuls only (attention apart)
    bf16 = cpu_bf16()
    console.print(
        f"{args.model}: {params / 1e6:.1f} M parameters; a batch of {len(trajectories)} "
        f"trajectories, {batch.tokens} tokens, {images} trained images; CPU bf16: "
        f"{', '.join(sorted(bf16)) or 'none (float32 only)'}"
    )
    peaks = {"float32": matmul_peak(torch.float32, args.threads)}
    if bf16:
        peaks["bfloat16"] = matmul_peak(torch.bfloat16, args.threads)
    console.print(
        "dense matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
    )
    paths = {  # name: (attention kernel, autocast dtype)
        "float32, dense mask": ("sdpa", None),
        "float32, per trajectory": ("trajectory", None),
        **({"bf16 autocast, per trajectory": ("trajectory", torch.bfloat16)} if bf16 else {}),
    }
    seconds = {}
    for name, (kernel, dtype) in paths.items():
        model = copy.deepcopy(base)
        model.config.attention = kernel
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer, dtype=dtype):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, _ = model.sft_loss(batch)
            loss.backward()
            optimizer.step()

        step()  # warm-up
        seconds[name] = min(_time(step) for _ in range(args.repeats))
        if args.profile:
            console.print(f"{name}, where one step's time goes: {profile_shares(step)}")
        peak = peaks["bfloat16" if dtype is not None else "float32"]
        achieved = flops / seconds[name] / 1e9
        console.print(
            f"{name}: {seconds[name] * 1000:.0f} ms/step, {images / seconds[name]:.1f} images/s, "
            f"{batch.tokens / seconds[name]:.0f} tokens/s, {achieved:.1f} GFLOP/s "
            f"({100 * achieved / peak:.0f}% of the {peak:.0f} GFLOP/s peak)"
        )
    eager = seconds["float32, dense mask"]
    ratios = ", ".join(f"{name} {eager / s:.2f}x" for name, s in list(seconds.items())[1:])
    return f"train: SFT steps/s against the float32 dense-mask path: {ratios}"


#: Every bench flag: (argparse arguments, the benches that read it).
FLAGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "--n": (dict(type=int, default=1000, help="workload size"), ("verifier", "adaptive")),
    "--resolution": (dict(type=int, default=64, help="image side in pixels"), ("verifier",)),
    "--seed": (
        dict(type=int, default=0, help="seed of prompts and models"),
        ("verifier", "rollout", "rollouts", "packing", "adaptive", "train"),
    ),
    "--repeats": (
        dict(type=int, default=3, help="timed repeats; the best is kept"),
        ("rollout", "packing", "train"),
    ),
    "--threads": (
        dict(type=int, default=2, help="torch CPU threads"),
        ("rollout", "rollouts", "packing", "adaptive", "train"),
    ),
    "--max-len": (
        dict(type=int, help="packed row length (None: the shortest of 512, 1024, … that fits)"),
        ("packing", "train"),
    ),
    "--model": (
        dict(default="shapeworld-tiny-sft", help="exported model"),
        ("rollouts", "adaptive", "train"),
    ),
    "--config": (dict(help="training YAML", required=True), ("memory",)),
    "--preset": (
        dict(default="bagel_7b", help="UnifiedConfig preset for a model folder that is not here"),
        ("memory",),
    ),
    "--prompts": (dict(type=int, default=8, help="prompts"), ("rollouts",)),
    "--group": (dict(type=int, default=4, help="rollouts per prompt"), ("rollouts",)),
    "--profile": (
        dict(action="store_true", help="also say where one step's time goes (torch.profiler)"),
        ("train",),
    ),
    "--batch": (dict(type=int, default=16, help="trajectories per step"), ("train",)),
}


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print its headline last."""
    parser = argparse.ArgumentParser(
        prog="avr bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=__doc__.split("\n")[0],
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, fn in BENCHES.items():
        summary = " ".join((fn.__doc__ or name).split()).split(". ")[0].rstrip(".") + "."
        bench_parser = sub.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for flag, (kwargs, benches) in FLAGS.items():
            if name in benches:
                bench_parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    console = Console()
    console.print(f"machine: {describe()}")
    headline = BENCHES[args.name](args, console)
    print(headline)  # unwrapped: the headline is one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
