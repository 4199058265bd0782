"""`python -m avr.research.claims METRICS.json… -o claims.md`: the papers' claims, measured.

Reads the `metrics.json` of one or more `avr.evaluate` runs on the same prompts (checked prompt by
prompt) and writes the claims table: each claim as a paired comparison on the same prompts (the
difference in GenEval accuracy, b − a, with its paired bootstrap interval and McNemar's p,
`avr.intervals.paired`), restricted to a complexity level where the claim names one, and a
verdict:

- **confirmed**: the 95% interval of the difference lies above 0;
- **refuted**: it lies below 0;
- **not resolvable at this size**: it contains 0 (or both arms are 0% on every prompt, so the
  difference says nothing about the claim).

The compute claim ("the complexity penalty saves compute") is confirmed when the run with the
penalty uses at least 10% fewer NFE per prompt and its accuracy is not significantly lower
(interval not below 0); refuted when it does not save 10%; a saving that costs accuracy is said
so. The critic claim ("the model judges its own images") reads the critique agreement
`avr.evaluate` records for each model's `reflect` run, with its Wilson interval, against 95%.
Runs are found by label `<model>/<mode>` (name the models in `avr.evaluate`:
`--model sft=DIR`); a claim whose runs are missing is listed as not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avr.intervals import paired, tag_mean, wilson

SAVING = 0.10  # the least relative NFE saving that counts as "saves compute"
CRITIC_TARGET = 0.95  # the agreement a critic must reach to turn the model's tries into answers


@dataclass(frozen=True)
class Roles:
    """Which model name of the evaluations plays which part."""

    sft: str = "sft"
    rl: str = "rl"
    no_penalty: str = "rl-no-penalty"
    no_stepwise: str = "rl-no-stepwise"
    best_of: str = "direct*2"
    """The compute-matched baseline's mode name (`avr.evaluate --modes 'direct*2'`)."""


@dataclass
class Claim:
    claim: str
    measured_as: str
    verdict: str
    numbers: str


def load(paths: list[str | Path]) -> dict:
    """The runs of every `metrics.json` in `paths`, by `<model>/<mode>`, with the shared prompt
    list; a file over other prompts is an error naming it and the first prompt that differs."""
    runs: dict = {}
    prompts = None
    for path in paths:
        path = Path(path)
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable metrics.json ({error})") from error
        listed = metrics.get("prompt_list")
        if listed is None:
            raise ValueError(
                f"{path}: no 'prompt_list' (written by avr.evaluate since 2026-11-24); rerun it"
            )
        if prompts is None:
            prompts, first = listed, path
        elif listed["prompt"] != prompts["prompt"]:
            n = min(len(listed["prompt"]), len(prompts["prompt"]))
            i = next((i for i in range(n) if listed["prompt"][i] != prompts["prompt"][i]), n)
            raise ValueError(
                f"{path}: not the prompts of {first} (prompt {i} differs, or the counts: "
                f"{len(listed['prompt'])} vs {len(prompts['prompt'])})"
            )
        for run in metrics["runs"].values():
            runs[f"{run['model']}/{run['mode']}"] = run
    if prompts is None:
        raise ValueError("no metrics.json given")
    return {"runs": runs, "prompts": prompts}


#: The paired comparisons of the claims table: (claim, how it is measured, run a, run b, the level
#: compared or None for all prompts); `{s}`, `{r}` and `{best_of}` are the roles' run names.
COMPARISONS = (
    ("adaptive beats direct", "after SFT: adaptive − direct, all prompts",
     "{s}/direct", "{s}/adaptive", None),
    ("adaptive beats direct", "after SFT + RL: adaptive − direct, all prompts",
     "{r}/direct", "{r}/adaptive", None),
    ("adaptive beats direct", "RL adaptive − SFT direct (the papers' headline), all prompts",
     "{s}/direct", "{r}/adaptive", None),
    ("reflect helps medium prompts", "reflect − direct, medium prompts (SFT)",
     "{s}/direct", "{s}/reflect", "medium"),
    ("reflect helps medium prompts",
     "reflect − compute-matched `{best_of}`, medium prompts (SFT)",
     "{s}/{best_of}", "{s}/reflect", "medium"),
    ("plan helps complex prompts", "plan − reflect, complex prompts (SFT)",
     "{s}/reflect", "{s}/plan", "complex"),
    ("plan helps complex prompts", "plan − direct, complex prompts (SFT)",
     "{s}/direct", "{s}/plan", "complex"),
    *(("RL improves on SFT", f"RL − SFT, {mode}", f"{{s}}/{mode}", f"{{r}}/{mode}", None)
      for mode in ("direct", "reflect", "plan", "adaptive")),
)  # fmt: skip


def measure(evaluations: dict, roles: Roles = Roles()) -> list[Claim]:
    """The claims table over `load(...)`'s runs (see the module docstring)."""
    runs, prompts = evaluations["runs"], evaluations["prompts"]
    tags, levels = np.asarray(prompts["tag"]), np.asarray(prompts["level"])
    names = {"s": roles.sft, "r": roles.rl, "best_of": roles.best_of}
    table = [
        _compare(runs, tags, levels, claim, how.format(**names), a.format(**names),
                 b.format(**names), level)
        for claim, how, a, b, level in COMPARISONS
    ]  # fmt: skip
    table.append(_penalty(runs, tags, f"{roles.no_penalty}/adaptive", f"{roles.rl}/adaptive"))
    for model in (roles.sft, roles.rl):
        table.append(_critic(runs, f"{model}/reflect"))
    table.append(
        _compare(
            runs,
            tags,
            levels,
            "step-wise rewards help",
            "RL with − without the step-wise reward, adaptive",
            f"{roles.no_stepwise}/adaptive",
            f"{roles.rl}/adaptive",
        )
    )
    return table


def _compare(runs, tags, levels, claim, measured_as, a, b, level=None) -> Claim:
    """Run `b` against run `a` on the same prompts (of `level`, or all): the paired difference
    with its interval and McNemar's p, and the verdict it supports."""
    missing = [label for label in (a, b) if label not in runs]
    if missing:
        return Claim(claim, measured_as, "not measured", f"no run {', '.join(missing)}")
    keep = np.ones(len(tags), bool) if level is None else levels == level
    if not keep.any():
        return Claim(claim, measured_as, "not measured", f"no {level} prompt")
    ca = np.asarray(runs[a]["correct"])[keep]
    cb = np.asarray(runs[b]["correct"])[keep]
    result = paired(ca, cb, tags[keep])
    low, high = result["interval"]
    if not ca.any() and not cb.any():
        verdict = "not resolvable at this size (both 0%)"
    elif low > 0:
        verdict = "confirmed"
    elif high < 0:
        verdict = "refuted"
    else:
        verdict = "not resolvable at this size"
    where = f"{level} prompts, " if level else ""
    numbers = (
        f"{_pct(tag_mean(cb, tags[keep]))} vs {_pct(tag_mean(ca, tags[keep]))}: "
        f"{100 * result['difference']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], "
        f"McNemar p = {result['mcnemar_p']:.2g} ({where}n = {int(keep.sum())})"
    )
    return Claim(claim, measured_as, verdict, numbers)


def _penalty(runs: dict, tags: np.ndarray, without: str, with_: str) -> Claim:
    claim, measured = (
        "the complexity penalty saves compute",
        "RL with − without the penalty, adaptive: NFE per prompt and accuracy",
    )
    missing = [label for label in (without, with_) if label not in runs]
    if missing:
        return Claim(claim, measured, "not measured", f"no run {', '.join(missing)}")
    nfe_with, nfe_without = (runs[x]["per_prompt"]["nfe"] for x in (with_, without))
    result = paired(runs[without]["correct"], runs[with_]["correct"], tags)
    low, high = result["interval"]
    saving = 1 - nfe_with / nfe_without if nfe_without else 0.0
    if saving < SAVING:
        verdict = "refuted"
    elif high < 0:
        verdict = "saves compute at a cost in accuracy"
    else:
        verdict = "confirmed"
    numbers = (
        f"NFE {nfe_with:.1f} vs {nfe_without:.1f} ({-100 * saving + 0.0:+.0f}%); accuracy "
        f"{100 * result['difference']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], "
        f"McNemar p = {result['mcnemar_p']:.2g}"
    )
    return Claim(claim, measured, verdict, numbers)


def _critic(runs: dict, label: str, target: float = CRITIC_TARGET) -> Claim:
    """Whether the model's critiques agree with the verifier on its own images (`reflect`
    rollouts, `avr.understanding`): confirmed when the Wilson interval of the agreement lies at
    or above `target`, refuted when it lies below."""
    claim = f"the model judges its own images (critique agrees with the verifier ≥ {target:.0%})"
    measured_as = f"critique agreement of `{label}` rollouts"
    critique = runs.get(label, {}).get("understanding", {}).get("critique", {})
    n = critique.get("critiques", 0)
    if not n:
        return Claim(claim, measured_as, "not measured", f"no critiques of {label}")
    agree = round(critique["agreement"] * n)
    low, high = wilson(agree, n)
    verdict = (
        "confirmed"
        if low >= target
        else "refuted"
        if high < target
        else "not resolvable at this size"
    )
    numbers = (
        f"{agree} of {n} ({_pct(agree / n)} [{100 * low:.1f}, {100 * high:.1f}]); balanced "
        f"accuracy {_pct(critique['balanced_accuracy'])}; right images called wrong "
        f"{_rate(critique['false_alarm_rate'])}, wrong images called right "
        f"{_rate(critique['miss_rate'])}"
    )
    return Claim(claim, measured_as, verdict, numbers)


def _rate(value: float | None) -> str:
    return "–" if value is None else _pct(value)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown(table: list[Claim], prompts: int) -> str:
    """The claims table as Markdown."""
    lines = [
        f"Claims measured on {prompts} prompts (paired on the same prompts; b vs a, "
        "difference with its 95% paired bootstrap interval):",
        "",
        "| claim | measured as | verdict | numbers |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {c.claim} | {c.measured_as} | {c.verdict} | {c.numbers} |" for c in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="avr claims",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The papers' claims as paired comparisons over avr.evaluate runs.",
    )
    parser.add_argument("metrics", nargs="+", help="metrics.json of avr.evaluate runs")
    parser.add_argument(
        "-o", "--output", help="write the table here (Markdown) as well (-: stdout alone)"
    )
    parser.add_argument("--json", help="write the claims as JSON here (-: on stdout, alone)")
    for field, default in vars(Roles()).items():
        parser.add_argument(
            f"--{field.replace('_', '-')}",
            default=default,
            help=f"the run label (model/mode in metrics.json) playing {field.replace('_', ' ')}",
        )
    args = parser.parse_args(argv)
    roles = Roles(**{f: getattr(args, f) for f in vars(Roles())})
    try:
        evaluations = load(args.metrics)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = measure(evaluations, roles)
    text = markdown(table, len(evaluations["prompts"]["prompt"]))
    claims = json.dumps([vars(c) for c in table], indent=2)
    if args.json == "-":  # the JSON alone, for a pipe
        print(claims)
        return 0
    print(text)
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(claims, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
