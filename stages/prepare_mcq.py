"""Stage prepare_mcq: read each multiple-choice suite into one record shape, drop and count bad records, pick the
scored questions (a stratified subsample by subject on the CPU default) and their k-shot examples.

Writes data/mcq/questions.jsonl (one scored question per line, its k-shot examples inline: only from non-test pools)
and reports/mcq/prepare.json (per suite: records read, dropped by reason with example ids, pools, the sample).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.data.mcq import SUITE_DATASETS, TASK_SUITE, McqDataError, held_out_ids, read_suite, select_shots
from stages.lib.data.sampling import stratified_sample
from stages.lib.io import run_metadata, setup_logging, write_json, write_jsonl

logger = logging.getLogger("stages.prepare_mcq")

PARAMS = ("mcq.suites", "mcq.max_samples", "mcq.seed", "mcq.k_shot", "task", "split.fractions", "split.seed")


def prepare_suite(records: list[dict], max_samples: int | None, k_shot: int, seed: int) -> tuple[list[dict], dict]:
    """(scored questions with their shots, what was picked) from one suite's records."""
    test = [r for r in records if r["pool"] == "test"]
    scored = stratified_sample(test, max_samples, key="subject", seed=seed)
    shots = select_shots(scored, [r for r in records if r["pool"] == "shots"], k_shot, seed)
    used = {len(s) for s in shots.values()}
    info = {"test_pool": len(test), "scored": len(scored), "pools": dict(Counter(r["pool"] for r in records)),
            "k_shot_used": max(used) if used else 0, "per_subject": dict(sorted(Counter(r["subject"] for r in scored)
                                                                                .items()))}
    return [{**rec, "shots": shots[rec["id"]]} for rec in scored], info


def fine_tuned_on(records: list[dict], problems: dict, fractions: dict, seed: int) -> tuple[list[dict], dict]:
    """task.type mcq trains on MedMCQA dev: only its held-out part (the split stage's test) stays scorable."""
    keep = held_out_ids(records, fractions, seed)
    kept = [r for r in records if r["id"] in keep or r["pool"] != "test"]
    logger.info("%s: task.type mcq trained on %d of its %d questions; %d held out stay scorable", TASK_SUITE,
                len(records) - len(kept), len(records), len(kept))
    note = {"task": "mcq", "held_out": len(kept), "trained_or_validated_on": len(records) - len(kept),
            "comparable": "no: a tenth of MedMCQA dev, not its official test (whose answers are not public)"}
    return kept, {**problems, "fine_tuned_on_this_suite": note}


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params, PARAMS)
    suites, sizes = params["mcq.suites"], params["mcq.max_samples"]
    questions, report = [], {}
    try:
        for suite in suites:
            records, problems = read_suite(suite, Path(args.raw) / SUITE_DATASETS[suite])
            if suite == TASK_SUITE and params["task"].type == "mcq":
                records, problems = fine_tuned_on(records, problems, params["split.fractions"], params["split.seed"])
            picked, info = prepare_suite(records, sizes.get(suite), params["mcq.k_shot"], params["mcq.seed"])
            questions += picked
            report[suite] = {**problems, **info}
            logger.info("%s: %d records (%d dropped), %d of %d test questions scored, %d-shot", suite,
                        problems["loaded"], sum(problems["dropped"].values()), info["scored"], info["test_pool"],
                        info["k_shot_used"])
    except McqDataError as err:
        logger.error("%s", err)
        return 1
    write_jsonl(args.out, questions)
    write_json(args.report, {"suites": report, "run": run_metadata()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--raw", required=True, help="download_mcq's output (one folder per dataset)")
    parser.add_argument("--out", required=True, help="scored questions JSONL")
    parser.add_argument("--report", required=True, help="counts JSON (uncached report)")
    return parser


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
