"""Leakage-free, stratified train/validation/test split (pure functions, no I/O).

MedQuAD repeats questions and answers across files and collections, so records are first grouped (union-find over
normalized question and answer texts, optionally the focus), and whole groups are then assigned to splits so that
every stratum gets its share. Only lists, dicts and seeded random.Random are iterated: nothing depends on hash
order, so the result is the same under any PYTHONHASHSEED.
"""

from __future__ import annotations

import random
from collections import Counter

from stages.lib.data.near_duplicates import DuplicateIndex, near_groups
from stages.lib.data.text import normalize_key

SPLITS = ("train", "validation", "test")
# Strata this big that miss a split point to a bug (or giant groups), not to bad luck: expected count >= 5 there.
MIN_EXPECTED_TO_REQUIRE = 5
# The share criterion in the issue applies to strata with at least this many records.
LARGE_STRATUM = 200


class SplitError(ValueError):
    """The records cannot be split as asked, or a split invariant does not hold."""


def group_keys(record: dict, group_by: str) -> list[str]:
    """Keys that force records into one group; an empty text or focus joins nothing. group_by "question" groups by
    the question alone: for multiple-choice records, whose short answers ("Vitamin A") many questions share."""
    keys = [f"q:{normalize_key(record['question'])}"]
    if group_by != "question":
        keys.append(f"a:{normalize_key(record['answer'])}")
    if group_by == "focus":
        keys.append(f"f:{normalize_key(record.get('focus') or '')}")
    return [key for key in keys if not key.endswith(":")]


def group_records(records: list[dict], group_by: str = "text",
                  extra_keys: list[list[str]] | None = None) -> list[list[int]]:
    """Record indices grouped by shared keys (transitively), groups ordered by their first record.

    `extra_keys[i]` are more keys of record i (e.g. its near-duplicate group), joined like the text keys.
    """
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    first_with_key: dict[str, int] = {}
    for index, record in enumerate(records):
        for key in group_keys(record, group_by) + (extra_keys[index] if extra_keys else []):
            other = first_with_key.setdefault(key, index)
            a, b = find(index), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for index in range(len(records)):
        groups.setdefault(find(index), []).append(index)
    return list(groups.values())


def stratum_of(record: dict, stratify_by: list[str]) -> str:
    return "|".join(str(record.get(key) or "") for key in stratify_by)


def assign_groups(strata: list[str], groups: list[list[int]], fractions: dict[str, float], seed: int) -> list[str]:
    """Split name per record. Greedy: largest groups first (ties in seeded random order), each to the split where it
    most reduces the chi-square distance between actual and target counts of every stratum it touches, plus the
    split sizes overall. A group's members count towards their own strata, so groups mixing strata are placed
    honestly; a lone record of a rare stratum lands in train, the largest target.
    """
    totals = Counter(strata)
    targets = {s: {t: fractions[s] * n for t, n in totals.items()} for s in SPLITS}
    current = {s: dict.fromkeys(totals, 0) for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(groups[g]))  # stable: equal sizes keep the shuffled order

    assignment = [""] * len(strata)
    for g in order:
        composition = Counter(strata[i] for i in groups[g])

        def cost(split: str) -> float:
            # increase of sum((count - target)^2 / target) when the group's members are added
            total = sum((2 * (current[split][t] - targets[split][t]) * c + c * c) / targets[split][t]
                        for t, c in composition.items())
            n, target = len(groups[g]), fractions[split] * len(strata)
            return total + (2 * (sizes[split] - target) * n + n * n) / target

        best = min(SPLITS, key=cost)  # min() keeps the first of equal costs: SPLITS order breaks ties
        for t, c in composition.items():
            current[best][t] += c
        sizes[best] += len(groups[g])
        for i in groups[g]:
            assignment[i] = best
    return assignment


def stratified_split(records: list[dict], fractions: dict[str, float], seed: int, stratify_by: list[str],
                     group_by: str = "text", extra_keys: list[list[str]] | None = None) -> dict[str, list[dict]]:
    """{split: records in input order}; the input is not modified."""
    groups = group_records(records, group_by, extra_keys)
    strata = [stratum_of(r, stratify_by) for r in records]
    assignment = assign_groups(strata, groups, fractions, seed)
    return {s: [r for r, a in zip(records, assignment) if a == s] for s in SPLITS}


def dataset_names(records: list[dict]) -> list[str]:
    """The `dataset` values in order of first appearance (prepare writes datasets in data.extra order)."""
    return list(dict.fromkeys(r.get("dataset", "") for r in records))


def split_datasets(records: list[dict], fractions: dict[str, float], seed: int, stratify_by: list[str],
                   group_by: str, near: tuple[float, int, int]) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """{dataset: {split: records}}: each dataset split on its own, the first exactly as if it were alone.

    The first dataset (MedQuAD) is grouped on exact texts only, so adding datasets cannot move one of its records.
    Each later dataset is grouped on exact texts and near-duplicates (`near` = Jaccard threshold, shingle words,
    MinHash permutations), then guarded against the datasets before it: a train/validation record near-identical
    to one of their test records is removed, and so is a test record near-identical to one of their
    train/validation records. Returns (splits, {dataset: removed by that guard}).
    """
    names = dataset_names(records)
    by_name = {n: [r for r in records if r.get("dataset", "") == n] for n in names}
    out = {names[0]: stratified_split(by_name[names[0]], fractions, seed, stratify_by, group_by)}
    guard: dict[str, dict[str, int]] = {}
    if len(names) == 1:
        return out, guard
    seen = {"test": DuplicateIndex(*near), "fit": DuplicateIndex(*near)}

    def remember(name: str) -> None:
        for split in SPLITS:
            for record in out[name][split]:
                seen["test" if split == "test" else "fit"].add(record, name)

    remember(names[0])
    for name in names[1:]:
        extra = [[key] for key in near_groups(by_name[name], *near)]
        parts = stratified_split(by_name[name], fractions, seed, stratify_by, group_by, extra)
        counts = {"train_or_validation_near_earlier_test": 0, "test_near_earlier_train_or_validation": 0}
        for split in SPLITS:
            other, counter = (("fit", "test_near_earlier_train_or_validation") if split == "test"
                              else ("test", "train_or_validation_near_earlier_test"))
            kept = [r for r in parts[split] if seen[other].match(r) is None]
            counts[counter] += len(parts[split]) - len(kept)
            parts[split] = kept
        out[name] = parts
        guard[name] = counts
        remember(name)
    return out, guard


def find_leaks(splits: dict[str, list[dict]], group_by: str = "text") -> dict[str, int]:
    """How many normalized questions/answers (and foci, ids) occur in more than one split.

    Recomputed from the split lists alone, independently of the union-find that built them.
    """
    fields = {"question": "question", "answer": "answer", "id": "id"}
    if group_by == "question":  # multiple-choice answers are short options that many questions share by design
        del fields["answer"]
    if group_by == "focus":
        fields["focus"] = "focus"
    leaks = {}
    for name, field in fields.items():
        normalize = (lambda v: v) if name == "id" else normalize_key
        seen = [{normalize(r.get(field) or "") for r in splits[s]} - {""} for s in SPLITS]
        leaks[name] = len((seen[0] & seen[1]) | (seen[0] & seen[2]) | (seen[1] & seen[2]))
    leaks["duplicate_ids"] = sum(len(rows) for rows in splits.values()) - len(
        {r["id"] for rows in splits.values() for r in rows})
    return leaks


def summarize_split(splits: dict[str, list[dict]], stratify_by: list[str], fractions: dict[str, float]) -> dict:
    """Counts per split and stratum, share deviations and strata missing from a split (JSON-ready, sorted)."""
    n = {s: len(splits[s]) for s in SPLITS}
    total = sum(n.values())
    counts = {s: Counter(stratum_of(r, stratify_by) for r in splits[s]) for s in SPLITS}
    strata = sorted(set().union(*counts.values()))
    table, worst, worst_rel, missing = {}, {"points": 0.0}, {"relative": 0.0}, {}
    for t in strata:
        size = sum(counts[s][t] for s in SPLITS)
        overall = size / total
        table[t] = {"total": size, **{s: counts[s][t] for s in SPLITS}}
        for s in SPLITS:
            share = counts[s][t] / n[s] if n[s] else 0.0
            points = 100 * (share - overall)
            if abs(points) > abs(worst["points"]):
                worst = {"points": round(points, 3), "stratum": t, "split": s}
            if size >= LARGE_STRATUM and abs(share / overall - 1) > abs(worst_rel["relative"]):
                worst_rel = {"relative": round(share / overall - 1, 4), "stratum": t, "split": s}
            if counts[s][t] == 0:
                missing.setdefault(t, []).append(s)
    return {
        "counts": n,
        "fractions": {s: round(n[s] / total, 5) if total else 0.0 for s in SPLITS},
        "max_fraction_deviation_points": round(max(100 * abs(n[s] / total - fractions[s]) for s in SPLITS), 3)
        if total else 0.0,
        "max_share_deviation": worst,
        f"max_relative_share_deviation_strata_{LARGE_STRATUM}_plus": worst_rel,
        "strata_missing_from_a_split": missing,
        "strata": table,
    }


def check_split(splits: dict[str, list[dict]], fractions: dict[str, float], leaks: dict[str, int],
                missing: dict[str, list[str]], strata_totals: dict[str, int]) -> None:
    """Raise SplitError unless: no leaks, no empty split, every sizeable stratum in every split."""
    bad = {k: v for k, v in leaks.items() if v}
    if bad:
        raise SplitError(f"texts or ids shared across splits: {bad}")
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise SplitError(f"split(s) {', '.join(empty)} would be empty; "
                         f"{sum(map(len, splits.values()))} records are too few for these fractions")
    smallest = min(fractions.values())
    required = sorted(t for t in missing if strata_totals[t] * smallest >= MIN_EXPECTED_TO_REQUIRE)
    if required:
        where = "; ".join(f"{t} not in {', '.join(missing[t])}" for t in required)
        raise SplitError(f"sizeable strata missing from a split ({where}): their groups are too large to balance")
