"""Stage split: group records that share a question or answer, then stratify groups into train/validation/test.

Each dataset is split on its own: MedQuAD exactly as when it is alone (test.jsonl is its test part, the same bytes
whatever else is merged), every added dataset also grouped on near-duplicates and held apart from MedQuAD's test
(split_datasets); their train/validation parts join train/validation.jsonl, their test parts test_added.jsonl.

task.type mcq splits MedMCQA dev instead (stages.lib.data.mcq.task_splits: by subject, grouped by question), so
tokenize and train learn reference 000's task and evaluate generates on its held-out part.

Deterministic for split.seed and independent of PYTHONHASHSEED; asserts no text is shared across splits before
writing anything.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import ConfigError, load_params
from stages.lib.data.mcq import SUITE_DATASETS, TASK_SUITE, McqDataError, read_suite, task_splits
from stages.lib.io import atomic_dir, read_jsonl, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.data.splitting import SPLITS, SplitError, check_split, find_leaks, split_datasets, summarize_split
from stages.lib.versions import check_versions

logger = logging.getLogger("stages.split")

# The near-duplicate settings are prepare's: the split groups by the same notion of "near" that prepare dedupes by.
PARAMS = ("split", "task", "prepare.near_jaccard", "prepare.shingle_words", "prepare.minhash_permutations")
LIBRARIES = ("pyyaml",)
# Fields every split file carries; downstream stages rely on them.
FIELDS = ("id", "question", "answer", "qtype", "source", "focus", "url", "dataset")
ADDED_TEST = "test_added"  # the added datasets' own held-out test parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, help="output folder of the prepare stage (qa.jsonl)")
    parser.add_argument("--out", required=True, help="output folder; gets train/validation/test.jsonl")
    parser.add_argument("--report", required=True, help="JSON report (a DVC metric)")
    parser.add_argument("--mcq-raw", default=None, help="download_mcq's output, read when task.type is mcq")
    return parser


def main(args: argparse.Namespace) -> int:
    check_versions(LIBRARIES)
    try:
        params = load_params(args.params, PARAMS)
        p, task = params["split"], params["task"].type
        near = tuple(params[f"prepare.{key}"] for key in ("near_jaccard", "shingle_words", "minhash_permutations"))
        if task == "mcq":
            if not args.mcq_raw:
                raise ConfigError("task.type mcq splits MedMCQA dev: pass --mcq-raw (download_mcq's output)")
            mcq_records, _ = read_suite(TASK_SUITE, Path(args.mcq_raw) / SUITE_DATASETS[TASK_SUITE])
            stratify_by, group_by = ["qtype"], "question"
            per_dataset, guard = {TASK_SUITE: task_splits(mcq_records, p.fractions, p.seed)}, {}
        else:
            stratify_by, group_by = p.stratify_by, p.group_by
            records = read_jsonl(Path(args.prepared) / "qa.jsonl")
            missing = sorted({key for r in records for key in stratify_by if key not in r})
            if missing:
                raise SplitError(f"split.stratify_by names field(s) the records lack: {', '.join(missing)}")
            per_dataset, guard = split_datasets(records, p.fractions, p.seed, stratify_by, group_by, near)
        first, *added = per_dataset
        splits = {s: [r for name in per_dataset for r in per_dataset[name][s]] for s in SPLITS}
        records = [r for rows in splits.values() for r in rows]
        summary = summarize_split(splits, stratify_by, p.fractions)
        leaks = find_leaks(splits, group_by)
        totals = {t: row["total"] for t, row in summary["strata"].items()}
        check_split(splits, p.fractions, leaks, summary["strata_missing_from_a_split"], totals)
        for name in added:  # each added dataset needs its own three parts (its test part is reported on its own)
            own = summarize_split(per_dataset[name], stratify_by, p.fractions)
            totals = {t: row["total"] for t, row in own["strata"].items()}
            try:
                check_split(per_dataset[name], p.fractions, {}, own["strata_missing_from_a_split"], totals)
            except SplitError as err:
                raise SplitError(f"dataset {name}: {err}") from None
    except (ConfigError, SplitError, McqDataError, OSError, ValueError) as err:
        logger.error("%s", err)
        return 1
    warn_missing_strata(summary, p.fractions)

    with atomic_dir(args.out) as tmp:
        files = {**{name: splits[name] for name in ("train", "validation")}, "test": per_dataset[first]["test"],
                 ADDED_TEST: [r for name in added for r in per_dataset[name]["test"]]}
        for name, rows in files.items():
            write_jsonl(tmp / f"{name}.jsonl", ({k: r.get(k, "") for k in FIELDS} for r in rows))
    task_info = {} if task == "qa" else {"task": task, "dataset": TASK_SUITE}
    report = {**task_info, "group_by": group_by, "stratify_by": stratify_by, "seed": p.seed,
              "target_fractions": p.fractions, **summary, "leaks": leaks}
    if added:
        report["per_dataset"] = {name: {s: len(parts[s]) for s in SPLITS} for name, parts in per_dataset.items()}
        report["near_duplicate_guard_removed"] = guard
    write_json(args.report, {**report, "run": run_metadata()})
    logger.info("split %d records: %s; largest share deviation %s", len(records), summary["counts"],
                summary["max_share_deviation"])
    return 0


def warn_missing_strata(summary: dict, fractions: dict) -> None:
    smallest = min(fractions.values())
    rare = []
    for stratum, where in summary["strata_missing_from_a_split"].items():
        total = summary["strata"][stratum]["total"]
        # a stratum too small to expect one record in the smallest split is bound to miss some: no warning
        if total * smallest < 1:
            rare.append(stratum)
        else:
            logger.warning("stratum %r (%d records) is absent from %s", stratum, total, ", ".join(where))
    if rare:
        logger.info("%d rare strata are absent from some split: %s", len(rare), ", ".join(rare))


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
