"""Paired bootstrap confidence intervals (percentile method), vectorised with numpy.

"Paired" = both systems answered the same questions, so each resample draws questions and keeps each question's
two scores together; that removes the between-question variance a two-sample test would leave in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Two-sided coverage of every interval (the field names say ci95).
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    value: float       # the statistic on the original sample
    ci95_low: float
    ci95_high: float

    def as_dict(self, value_key: str = "mean") -> dict:
        return {value_key: self.value, "ci95_low": self.ci95_low, "ci95_high": self.ci95_high}


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) question indices drawn with replacement; the same seed gives the same draws."""
    if n < 1:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _percentile_interval(value: float, stats: np.ndarray) -> Interval:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def paired_bootstrap_ci(a, b, n_resamples: int, seed: int) -> Interval:
    """CI of mean(a - b) over paired per-question scores a[i], b[i]."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    diff = a - b
    idx = resample_indices(len(diff), n_resamples, seed)
    return _percentile_interval(diff.mean(), diff[idx].mean(axis=1))


def perplexity(nll_sum, n_tokens) -> float:
    """exp of the token-weighted mean NLL over a set of answers."""
    total = float(np.sum(n_tokens))
    if total <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return float(np.exp(np.sum(nll_sum) / total))


def perplexity_reduction_ci(nll_base, nll_new, n_tokens, n_resamples: int, seed: int) -> Interval:
    """CI of 1 - ppl_new / ppl_base, both models scoring the same answer tokens (paired by question).

    The ratio of perplexities is exp((sum nll_new - sum nll_base) / sum tokens), so it is resampled as one
    statistic instead of as a mean of per-question ratios (long answers weigh more, as in the point estimate).
    """
    nll_base, nll_new, n_tokens = (np.asarray(x, dtype=float) for x in (nll_base, nll_new, n_tokens))
    if not (nll_base.shape == nll_new.shape == n_tokens.shape) or nll_base.ndim != 1:
        raise ValueError("nll_base, nll_new and n_tokens must be 1-D arrays of equal length")
    if np.any(n_tokens <= 0):
        raise ValueError("every question needs at least one scored answer token")
    diff = nll_new - nll_base
    idx = resample_indices(len(diff), n_resamples, seed)
    stats = 1 - np.exp(diff[idx].sum(axis=1) / n_tokens[idx].sum(axis=1))
    return _percentile_interval(1 - np.exp(diff.sum() / n_tokens.sum()), stats)
