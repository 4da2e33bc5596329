"""Exact and near-duplicate texts across datasets: MinHash on word shingles (datasketch), confirmed exactly.

Two texts are near-duplicates when the Jaccard similarity of their word k-shingle sets (over normalize_key text)
is at least a threshold. MinHash LSH only proposes candidates; each candidate is confirmed on the shingle sets
themselves, so what counts as a duplicate does not depend on the hash permutations (LSH can still miss a pair
just above the threshold: it is tuned to balance misses and false candidates). Keys are list indices and results
are sorted, so nothing depends on hash order.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.lib.data.text import normalize_key

FIELDS = ("question", "answer")
KINDS = ("question_exact", "answer_exact", "question_near", "answer_near")


def shingles(text: str, k: int) -> frozenset[str]:
    """Word k-shingles of the normalized text; a text shorter than k words is one shingle (empty text: none)."""
    words = normalize_key(text).split()
    if len(words) <= k:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + k]) for i in range(len(words) - k + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


class NearIndex:
    """Texts added one by one; `find` returns the indices of added texts at least `threshold` similar."""

    def __init__(self, threshold: float, k: int, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.k, self.num_perm = threshold, k, num_perm
        # datasketch refuses threshold 1 (it would need a single band); 0.99 only proposes more candidates, and the
        # exact check below still decides
        self.lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
        self.sets: list[frozenset] = []

    def signature(self, sets: frozenset):
        from datasketch import MinHash

        mh = MinHash(num_perm=self.num_perm, seed=1)
        mh.update_batch([s.encode("utf-8") for s in sorted(sets)])
        return mh

    def add(self, text: str) -> int:
        """Index the text; returns its index (empty texts are kept in the numbering but never match)."""
        sets = shingles(text, self.k)
        index = len(self.sets)
        self.sets.append(sets)
        if sets:
            self.lsh.insert(index, self.signature(sets))
        return index

    def find(self, text: str) -> list[int]:
        sets = shingles(text, self.k)
        if not sets:
            return []
        candidates = sorted(self.lsh.query(self.signature(sets)))
        return [i for i in candidates if jaccard(sets, self.sets[i]) >= self.threshold]


class DuplicateIndex:
    """Questions and answers of records already kept: exact normalized keys plus one NearIndex per field.

    `owner(i)` is whatever label the caller gave record i (its dataset, its split).
    """

    def __init__(self, threshold: float, k: int, num_perm: int):
        self.exact = {f: {} for f in FIELDS}
        self.near = {f: NearIndex(threshold, k, num_perm) for f in FIELDS}
        self.owners: list[str] = []

    def add(self, record: dict, owner: str) -> None:
        index = len(self.owners)
        self.owners.append(owner)
        for f in FIELDS:
            key = normalize_key(record[f])
            if key:
                self.exact[f].setdefault(key, index)
            self.near[f].add(record[f])

    def match(self, record: dict) -> tuple[str, int] | None:
        """(kind, index of the first matching record) for the first of KINDS that applies, or None."""
        for f in FIELDS:
            hit = self.exact[f].get(normalize_key(record[f]))
            if hit is not None:
                return f"{f}_exact", hit
        for f in FIELDS:
            hits = self.near[f].find(record[f])
            if hits:
                return f"{f}_near", hits[0]
        return None


def dedupe_across(datasets: Sequence[tuple[str, list[dict]]], threshold: float, k: int,
                  num_perm: int) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    """Drop every record whose question or answer duplicates (exactly or nearly) one of an earlier dataset.

    Datasets are taken in order: the first loses nothing, each later one is checked against everything kept
    before it (not against itself: duplicates inside a dataset are the split's to group). Returns
    ({dataset: kept records}, {"<dataset> vs <earlier dataset>": {kind: removed}}).
    """
    index = DuplicateIndex(threshold, k, num_perm)
    kept: dict[str, list[dict]] = {}
    removed: dict[str, dict[str, int]] = {}
    for position, (name, records) in enumerate(datasets):
        for earlier, _ in datasets[:position]:
            removed[f"{name} vs {earlier}"] = dict.fromkeys(KINDS, 0)
        survivors = []
        for record in records:
            hit = index.match(record) if position else None
            if hit is None:
                survivors.append(record)
            else:
                kind, other = hit
                removed[f"{name} vs {index.owners[other]}"][kind] += 1
        for record in survivors:
            index.add(record, name)
        kept[name] = survivors
    return kept, removed


def near_groups(records: list[dict], threshold: float, k: int, num_perm: int) -> list[str]:
    """A group key per record: records whose question or answer is near-identical share one (transitively).

    The key is "n:<index of the group's first record>"; the split adds it to the exact-text keys it groups on.
    """
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    indexes = {f: NearIndex(threshold, k, num_perm) for f in FIELDS}
    for i, record in enumerate(records):
        for f in FIELDS:
            for j in indexes[f].find(record[f]):
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            indexes[f].add(record[f])
    return [f"n:{find(i)}" for i in range(len(records))]
