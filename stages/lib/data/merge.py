"""Free-text datasets merged after MedQuAD (data.extra): records from each file, types, caps, cross-dataset dedup.

Every record gets `dataset` (medquad for data.source, else its data.datasets name); MedQuAD's `source` (its
collection) is kept. The order of data.extra is the priority: a record duplicating one of an earlier dataset is
dropped from the later one and counted under that pair.
"""

from __future__ import annotations

from stages.lib.config import MEDQUAD_DATASET
from stages.lib.data.medquad import MalformedFileError, clean_records, records_from_alpaca, records_from_table
from stages.lib.data.near_duplicates import dedupe_across
from stages.lib.data.qtypes import assign_qtypes
from stages.lib.data.sampling import stratified_sample

MEDQUAD_LICENCE = "CC BY 4.0 (MedQuAD, Ben Abacha and Demner-Fushman, BMC Bioinformatics 2019)"


def parse_extra(name: str, entry: dict, data: bytes | list[dict], file_name: str) -> list[dict]:
    """Records of one added dataset: `data` is the file's bytes (alpaca) or its table rows (table).

    Ids are "<name>/<row>"; source defaults to the dataset name; qtype is raw (see assign_qtypes).
    """
    if entry["format"] == "alpaca":
        records = records_from_alpaca(data, file_name)
    else:
        if not data:
            raise MalformedFileError(file_name, "the table has no rows")
        records = records_from_table(data, entry.get("columns") or {}, file_name)
        if not (entry.get("columns") or {}).get("qtype"):
            records = [{**r, "qtype": ""} for r in records]  # records_from_table's "unknown" is no type either
    has_source = bool((entry.get("columns") or {}).get("source"))
    return [{**r, "id": f"{name}/{index}", "source": r["source"] if has_source else name, "dataset": name}
            for index, r in enumerate(records)]


def merge_datasets(medquad: list[dict], extras: list[tuple[str, dict, list[dict]]], prep) -> tuple[list[dict], dict]:
    """MedQuAD's records and each added dataset's, cleaned, typed, deduplicated across datasets and capped.

    `extras` holds (name, data.datasets entry, parsed records) in data.extra order; `prep` is a PrepareParams.
    Returns (records in dataset order, report). MedQuAD alone comes out exactly as clean_records leaves it, with
    `dataset` added.
    """
    kept, counts = clean_records(medquad, prep)
    kept = [{**r, "dataset": MEDQUAD_DATASET} for r in kept]
    report = {"medquad": counts, "datasets": {MEDQUAD_DATASET: {"licence": MEDQUAD_LICENCE, "in": counts["in"],
                                                                "after_filters": counts["kept"]}}}
    if not extras:
        report["datasets"][MEDQUAD_DATASET]["kept"] = len(kept)
        return kept, report
    cleaned = [(MEDQUAD_DATASET, kept)]
    inferred_ids: dict[str, set[str]] = {}
    for name, _entry, records in extras:
        typed, from_pattern = assign_qtypes(records)
        inferred_ids[name] = {r["id"] for r, inferred in zip(typed, from_pattern) if inferred}
        kept_extra, extra_counts = clean_records(typed, prep)
        cleaned.append((name, kept_extra))
        report["datasets"][name] = {"in": extra_counts["in"], "after_filters": extra_counts["kept"],
                                    "dropped_by_reason": extra_counts["dropped_by_reason"]}
    deduped, removed = dedupe_across(cleaned, prep.near_jaccard, prep.shingle_words, prep.minhash_permutations)
    merged = list(deduped[MEDQUAD_DATASET])
    report["datasets"][MEDQUAD_DATASET]["kept"] = len(merged)
    for name, entry, _ in extras:
        survivors = deduped[name]
        capped = stratified_sample(survivors, entry.get("cap"), "qtype", prep.cap_seed)
        from_pattern: dict[str, int] = {}
        for r in capped:
            if r["id"] in inferred_ids[name]:
                from_pattern[r["qtype"]] = from_pattern.get(r["qtype"], 0) + 1
        report["datasets"][name].update({
            "removed_as_cross_dataset_duplicates": report["datasets"][name]["after_filters"] - len(survivors),
            "cap": entry.get("cap"), "dropped_by_cap": len(survivors) - len(capped), "kept": len(capped),
            "qtypes_from_pattern": sum(from_pattern.values()),
            "qtypes_from_pattern_per_qtype": dict(sorted(from_pattern.items())),
            "per_qtype": _count(capped, "qtype"),
        })
        merged += capped
    report["cross_dataset_duplicates"] = removed
    return merged, report


def _count(records: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r[key]] = out.get(r[key], 0) + 1
    return dict(sorted(out.items()))
