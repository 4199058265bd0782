"""`python -m avr.bench NAME`: speed measured side by side, the headline figure as the last line.

Benchmarks name the machine they ran on; figures in the README and closing notes come from here,
never from timed tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console

from avr.world import Verifier, degrade, render, sample_scene, sample_specs

BENCHES: dict[str, Callable[[argparse.Namespace, Console], str]] = {}


def bench(fn: Callable[[argparse.Namespace, Console], str]):
    """Register a benchmark under its function name; it returns its headline line."""
    if fn.__name__ in BENCHES:
        raise ValueError(f"benchmark {fn.__name__!r} is already registered")
    BENCHES[fn.__name__] = fn
    return fn


def machine() -> str:
    """One line naming the machine: CPU model, cores available, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} core(s), Python {platform.python_version()}"


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


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print its headline last."""
    parser = argparse.ArgumentParser(prog="python -m avr.bench", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--n", type=int, default=1000, help="workload size")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console()
    console.print(f"machine: {machine()}")
    headline = BENCHES[args.name](args, console)
    console.print(headline, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
