"""Stage mcq_compare: accuracy of base and fine-tuned on each multiple-choice suite, with bootstrap CIs, the paired
fine-tuned - base difference, chance, the majority baseline and (PubMedQA) macro-F1, under both normalisations.

Writes reports/mcq/metrics.json (per suite, numbers only, the mcq.headline normalisation: a DVC metric beside
reports/metrics.json), reports/mcq/evaluation.json (everything) and reports/mcq/per_subject.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging

from stages.lib.config import load_params
from stages.lib.evaluation.mcq_metrics import all_metrics, headline, per_subject_rows
from stages.lib.io import atomic_file, read_jsonl, run_metadata, setup_logging, write_json
from stages.lib.versions import check_versions

log = logging.getLogger("stages.mcq_compare")

PARAMS = ("mcq.headline", "mcq.bootstrap_samples", "mcq.seed")
LIBRARIES = ("numpy",)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(args: argparse.Namespace) -> None:
    check_versions(LIBRARIES)
    params = load_params(args.params, PARAMS)
    norm, n, seed = params["mcq.headline"], params["mcq.bootstrap_samples"], params["mcq.seed"]
    base, finetuned = read_jsonl(args.base_scores), read_jsonl(args.finetuned_scores)
    if not base:
        raise ValueError(f"no scores in {args.base_scores}")
    metrics = all_metrics(base, finetuned, n, seed)
    for suite, row in headline(metrics, norm).items():
        log.info("%s (n=%d): base %.3f, fine-tuned %.3f, FT - base %+.3f [%+.3f, %+.3f]; chance %.3f, majority %.3f",
                 suite, row["n"], row["base"], row["finetuned"], row["delta"], row["delta_ci95_low"],
                 row["delta_ci95_high"], row["chance"], row["majority"])
    details = {"headline_normalisation": norm, "suites": metrics,
               "bootstrap": {"samples": n, "seed": seed, "method": "paired, percentile"}, **run_metadata()}
    table = per_subject_rows(base, finetuned, norm)
    with atomic_file(args.per_subject) as fh:
        fh.write(to_csv(table))
    write_json(args.details, details)
    write_json(args.metrics, headline(metrics, norm))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--base-scores", required=True, help="mcq_base's per-question scores")
    parser.add_argument("--finetuned-scores", required=True, help="mcq_finetuned's per-question scores")
    parser.add_argument("--metrics", required=True, help="per-suite numbers JSON (a DVC metric)")
    parser.add_argument("--details", required=True, help="every accuracy, CI and baseline, JSON")
    parser.add_argument("--per-subject", required=True, help="per-subject CSV")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
