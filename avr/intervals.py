"""Uncertainty of evaluation figures: 95% intervals of accuracies and paired comparisons of two
runs on the same prompts.

- A proportion (accuracy over one tag, one level): Wilson's score interval (`scipy.stats`), which
  stays inside [0, 1] and behaves at 0 and n successes, where the normal approximation does not.
- GenEval's overall accuracy (the mean over tags of per-tag accuracy): a percentile bootstrap over
  prompts, resampled within each tag so every tag keeps its size.
- Two runs on the same prompts (mode against mode, model against model): the difference of their
  overall accuracies with a paired bootstrap interval (the same resampled prompts for both runs),
  and McNemar's exact test on the prompts where exactly one of them succeeded.

Bootstraps are seeded: the same outcomes give the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of `successes` out of `n` (`(nan, nan)` when n = 0)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def tag_mean(correct: np.ndarray, tags: Sequence[str]) -> float:
    """GenEval's overall: the mean over tags of each tag's accuracy."""
    tags = np.asarray(tags)
    return float(np.mean([correct[tags == t].mean() for t in np.unique(tags)]))


def _resamples(tags: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """`[n_boot, n]` prompt indices, resampled with replacement within each tag."""
    tags = np.asarray(tags)
    rng = np.random.default_rng(seed)
    columns = []
    for tag in np.unique(tags):
        members = np.flatnonzero(tags == tag)
        columns.append(rng.choice(members, size=(n_boot, len(members)), replace=True))
    return np.concatenate(columns, axis=1)


def _tag_means(correct: np.ndarray, tags: Sequence[str], index: np.ndarray) -> np.ndarray:
    """GenEval overall of each resample (rows of `index`)."""
    tags = np.asarray(tags)
    per_tag = [
        correct[index][:, tags[index[0]] == t].mean(1) for t in np.unique(tags)
    ]  # resampling within tags keeps each column's tag
    return np.mean(per_tag, axis=0)


def overall_interval(
    correct: Sequence[bool],
    tags: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of GenEval's overall accuracy (stratified by tag). Where
    every outcome is the same (0 or n successes) every resample is too and the bootstrap collapses
    to a point, so the interval is then Wilson's for the pooled count, which does not."""
    correct = np.asarray(correct, dtype=float)
    if not len(correct):
        return (float("nan"), float("nan"))
    if correct.min() == correct.max():
        return wilson(int(correct.sum()), len(correct), confidence)
    means = _tag_means(correct, tags, _resamples(tags, n_boot, seed))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def paired(
    a: Sequence[bool],
    b: Sequence[bool],
    tags: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """`b` against `a` on the same prompts: the difference of GenEval overall accuracy (b − a)
    with its paired bootstrap interval, the prompts only `a` / only `b` got right, and McNemar's
    exact two-sided p-value."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired runs need the same prompts: {len(a)} vs {len(b)} outcomes")
    index = _resamples(tags, n_boot, seed)
    differences = _tag_means(b, tags, index) - _tag_means(a, tags, index)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(differences, [alpha, 1 - alpha])
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    discordant = only_a + only_b
    p = binomtest(only_b, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "difference": tag_mean(b, tags) - tag_mean(a, tags),
        "interval": [float(low), float(high)],
        "only_a": only_a,
        "only_b": only_b,
        "mcnemar_p": float(p),
        "prompts": len(a),
    }
