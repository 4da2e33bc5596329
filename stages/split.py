"""Stage split: group records that share a question or answer, then stratify groups into train/validation/test.

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
from stages.lib.data.splitting import SPLITS, SplitError, check_split, find_leaks, stratified_split, summarize_split
from stages.lib.versions import check_versions

logger = logging.getLogger("stages.split")

PARAMS = ("split", "task")
LIBRARIES = ("pyyaml",)
# Fields every split file carries; downstream stages rely on them.
FIELDS = ("id", "question", "answer", "qtype", "source", "focus", "url")


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
        if task == "mcq":
            if not args.mcq_raw:
                raise ConfigError("task.type mcq splits MedMCQA dev: pass --mcq-raw (download_mcq's output)")
            mcq_records, _ = read_suite(TASK_SUITE, Path(args.mcq_raw) / SUITE_DATASETS[TASK_SUITE])
            stratify_by, group_by = ["qtype"], "question"
            splits = task_splits(mcq_records, p.fractions, p.seed)
            records = [r for rows in splits.values() for r in rows]
        else:
            stratify_by, group_by = p.stratify_by, p.group_by
            records = read_jsonl(Path(args.prepared) / "qa.jsonl")
            missing = sorted({key for r in records for key in stratify_by if key not in r})
            if missing:
                raise SplitError(f"split.stratify_by names field(s) the records lack: {', '.join(missing)}")
            splits = stratified_split(records, p.fractions, p.seed, stratify_by, group_by)
        summary = summarize_split(splits, stratify_by, p.fractions)
        leaks = find_leaks(splits, group_by)
        totals = {t: row["total"] for t, row in summary["strata"].items()}
        check_split(splits, p.fractions, leaks, summary["strata_missing_from_a_split"], totals)
    except (ConfigError, SplitError, McqDataError, OSError, ValueError) as err:
        logger.error("%s", err)
        return 1
    smallest = min(p.fractions.values())
    rare = []
    for stratum, where in summary["strata_missing_from_a_split"].items():
        # a stratum too small to expect one record in the smallest split is bound to miss some: no warning
        if totals[stratum] * smallest < 1:
            rare.append(stratum)
        else:
            logger.warning("stratum %r (%d records) is absent from %s", stratum, totals[stratum], ", ".join(where))
    if rare:
        logger.info("%d rare strata are absent from some split: %s", len(rare), ", ".join(rare))

    with atomic_dir(args.out) as tmp:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", ({k: r.get(k, "") for k in FIELDS} for r in splits[name]))
    task_info = {} if task == "qa" else {"task": task, "dataset": TASK_SUITE}
    write_json(args.report, {**task_info, "group_by": group_by, "stratify_by": stratify_by, "seed": p.seed,
                             "target_fractions": p.fractions, **summary, "leaks": leaks, "run": run_metadata()})
    logger.info("split %d records: %s; largest share deviation %s", len(records), summary["counts"],
                summary["max_share_deviation"])
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
