"""Bootstrap intervals for accuracy over documents: how much a mean could move on other documents.

Percentile bootstrap: each replicate draws as many documents as a task has, with replacement, and
takes the mean of their scores; the interval is the middle `level` share of the replicates' means.
Two runs scored on the same documents are resampled with the same indices (paired), so what they
share, the easy and the hard documents, cancels out of their difference. An average over tasks
resamples each task on its own (stratified) and weighs the task means alike, as `lsjax eval` does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from lsjax.errors import ConfigError

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95
CHUNK_CELLS = 1 << 22  # resampled indices held at once, so a large task never needs replicates x documents

Interval = tuple[float, float]


def check_settings(replicates: int, seed: int, level: float = DEFAULT_LEVEL) -> None:
    """Refuse settings numpy would reject late or misread: they name the parameter and what it takes."""
    if not isinstance(replicates, (int, np.integer)) or isinstance(replicates, bool) or replicates < 1:
        raise ConfigError(f"replicates={replicates!r} is invalid; expected a positive integer (bootstrap resamples)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; expected a non-negative integer")
    if not 0 < level < 1:
        raise ConfigError(f"level={level!r} is invalid; expected a coverage between 0 and 1, e.g. 0.95")


def _scores(scores: ArrayLike) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ConfigError(f"scores of shape {x.shape} are invalid; expected a non-empty 1-D array of finite "
                          "per-document scores")
    return x


def resampled_means(scores: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `replicates` resamples of the rows (documents) of `scores` `[n]` or `[n, runs]`.

    Each replicate draws one set of row indices for every column: that is what pairs runs.
    """
    n = len(scores)
    chunk = max(1, CHUNK_CELLS // n)
    means = []
    for start in range(0, replicates, chunk):
        idx = rng.integers(0, n, size=(min(chunk, replicates - start), n))
        means.append(scores[idx].mean(axis=1))
    return np.concatenate(means)


def stratified_means(strata: Sequence[np.ndarray], replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of the unweighted mean over strata (tasks) of their means, each stratum resampled on its own."""
    if not strata:
        raise ConfigError("no tasks to average; expected one array of per-document scores per task")
    return np.mean([resampled_means(s, replicates, rng) for s in strata], axis=0)


def percentile_interval(samples: np.ndarray, level: float) -> Interval:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def average_interval(strata: Sequence[ArrayLike], *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                     level: float = DEFAULT_LEVEL) -> Interval:
    """Interval of the unweighted mean over tasks of each task's mean score (stratified bootstrap)."""
    check_settings(replicates, seed, level)
    strata = [_scores(s) for s in strata]
    return percentile_interval(stratified_means(strata, replicates, np.random.default_rng(seed)), level)


def mean_interval(scores: ArrayLike, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                  level: float = DEFAULT_LEVEL) -> Interval:
    """Percentile bootstrap interval of the mean of per-document scores."""
    return average_interval([scores], replicates=replicates, seed=seed, level=level)


def average_difference_interval(strata_a: Sequence[ArrayLike], strata_b: Sequence[ArrayLike], *,
                                replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                                level: float = DEFAULT_LEVEL) -> Interval:
    """Paired interval of B's average over tasks minus A's, both runs scored on the same documents of each task."""
    check_settings(replicates, seed, level)
    if len(strata_a) != len(strata_b):
        raise ConfigError(f"{len(strata_a)} tasks of run A against {len(strata_b)} of run B; expected the same tasks")
    pairs = []
    for k, (a, b) in enumerate(zip(strata_a, strata_b)):
        a, b = _scores(a), _scores(b)
        if len(a) != len(b):
            raise ConfigError(f"task {k}: {len(a)} scores of run A against {len(b)} of run B; a paired difference "
                              "needs both runs' scores on the same documents")
        pairs.append(np.stack([a, b], axis=1))
    means = stratified_means(pairs, replicates, np.random.default_rng(seed))
    return percentile_interval(means[:, 1] - means[:, 0], level)


def paired_difference_interval(a: ArrayLike, b: ArrayLike, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                               level: float = DEFAULT_LEVEL) -> Interval:
    """Interval of mean(b) - mean(a) over the same documents, both resampled with the same indices."""
    return average_difference_interval([a], [b], replicates=replicates, seed=seed, level=level)
