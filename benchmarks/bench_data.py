"""Time the data half on the full MedQuAD: parse all 11,274 XML files, clean, group and split. Target: <= 30 s.

    python -m benchmarks.bench_data --root ../shared/medquad [--params params.yaml]

Uses the same library functions as the prepare and split stages, without their file writes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.data.medquad import clean_records, parse_collection
from stages.lib.data.splitting import find_leaks, group_records, stratified_split, summarize_split

TARGET_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/medquad", help="folder holding the 12 collection folders")
    parser.add_argument("--params", default="params.yaml")
    return parser


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params, ("prepare", "split"))
    prep, sp = params["prepare"], params["split"]
    rows = []

    def timed(label, fn, detail):
        start = time.perf_counter()
        result = fn()
        rows.append((label, time.perf_counter() - start, detail(result)))
        return result

    records, _, files = timed("parse XML", lambda: parse_collection(Path(args.root), False),
                              lambda r: f"{r[2]:,} files, {len(r[0]):,} pairs")
    kept, counts = timed("normalize + filter", lambda: clean_records(records, prep),
                         lambda r: f"{r[1]['answered']:,} answered, {r[1]['kept']:,} kept")
    timed("group (union-find)", lambda: group_records(kept, sp.group_by),
                   lambda g: f"{len(g):,} groups, largest {max(map(len, g))}")
    splits = timed("group + stratified split", lambda: stratified_split(kept, sp.fractions, sp.seed,
                                                                        sp.stratify_by, sp.group_by),
                   lambda s: ", ".join(f"{k} {len(v):,}" for k, v in s.items()))
    timed("report + leak check", lambda: (summarize_split(splits, sp.stratify_by, sp.fractions),
                                          find_leaks(splits, sp.group_by)),
          lambda r: f"max share deviation {r[0]['max_share_deviation']['points']} points, leaks {sum(r[1].values())}")

    # grouping alone is timed to show where the split time goes; it is part of the next row, so not summed twice
    total = sum(seconds for label, seconds, _ in rows if label != "group (union-find)")
    width = max(len(label) for label, _, _ in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  detail")
    for label, seconds, detail in rows:
        print(f"{label:<{width}}  {seconds:8.2f}  {detail}")
    print(f"{'parse + split total':<{width}}  {total:8.2f}  target <= {TARGET_SECONDS:.0f} s: "
          f"{'PASS' if total <= TARGET_SECONDS else 'FAIL'}")
    return 0 if total <= TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
