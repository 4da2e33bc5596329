"""Stratified subsampling shared by tokenize (train/validation caps) and evaluate (test subset)."""

from __future__ import annotations

import random
from collections import defaultdict


def stratified_sample(records: list[dict], n: int | None, key: str, seed: int) -> list[dict]:
    """Pick n records keeping each stratum's share (largest-remainder rounding, at least one of each
    stratum while n allows). Deterministic for a seed, independent of hash order; input order is kept
    and the input is not mutated. n None or >= len(records) returns a copy of all records."""
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_stratum[str(rec.get(key))].append(i)
    strata = sorted(by_stratum)
    total = len(records)
    exact = {s: n * len(by_stratum[s]) / total for s in strata}
    quota = {s: int(exact[s]) for s in strata}
    # Rare strata get one slot each first (while n allows), so small types stay visible.
    for s in sorted(strata, key=lambda s: (-len(by_stratum[s]), s)):
        if quota[s] == 0 and sum(quota.values()) < n:
            quota[s] = 1
    remainder = sorted(strata, key=lambda s: (-(exact[s] - int(exact[s])), s))
    i = 0
    while sum(quota.values()) < n:
        s = remainder[i % len(remainder)]
        if quota[s] < len(by_stratum[s]):
            quota[s] += 1
        i += 1
    while sum(quota.values()) > n:  # the one-each rule can overshoot only when n < number of strata
        s = max(strata, key=lambda s: (quota[s], s))
        quota[s] -= 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for s in strata:
        chosen += rng.sample(by_stratum[s], quota[s])
    return [records[i] for i in sorted(chosen)]
