"""Check the split files against the "done when" criteria of issue 3; prints PASS/FAIL per criterion.

    python -m benchmarks.check_split --split data/split [--rerun]

--rerun also runs the split stage twice more under other PYTHONHASHSEED values and compares the files byte for byte.
Exit status 1 when any criterion fails.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from stages.lib.io import read_jsonl
from stages.lib.data.text import normalize_key

ROOT = Path(__file__).resolve().parents[1]

SPLITS = ("train", "validation", "test")
TARGET = {"train": 0.8, "validation": 0.1, "test": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="data/split")
    parser.add_argument("--min-kept", type=int, default=15_500)
    parser.add_argument("--rerun", action="store_true", help="rerun the split stage under two other PYTHONHASHSEEDs")
    parser.add_argument("--params", default="params.yaml", help="for --rerun")
    parser.add_argument("--prepared", default="data/prepared", help="for --rerun")
    return parser


def check(splits: dict[str, list[dict]], min_kept: int) -> list[tuple[str, bool, str]]:
    results = []
    n = {s: len(splits[s]) for s in SPLITS}
    total = sum(n.values())
    results.append((f"kept >= {min_kept}", total >= min_kept, f"{total} examples"))

    worst = max(abs(n[s] / total - TARGET[s]) for s in SPLITS)
    results.append(("split fractions within 1 point of 80/10/10", worst <= 0.01,
                    ", ".join(f"{s} {n[s] / total:.4f}" for s in SPLITS)))

    per_split = {s: Counter(r["qtype"] for r in splits[s]) for s in SPLITS}
    overall = sum(per_split.values(), Counter())
    bad, worst_pts, worst_rel = [], 0.0, 0.0
    for qtype, size in sorted(overall.items()):
        if size < 200:
            continue
        share = size / total
        for s in SPLITS:
            got = per_split[s][qtype] / n[s]
            worst_pts, worst_rel = max(worst_pts, abs(got - share)), max(worst_rel, abs(got / share - 1))
            if abs(got - share) > 0.02 or abs(got / share - 1) > 0.20:
                bad.append(f"{qtype}/{s}")
    results.append(("qtypes >= 200: share within 2 points and 20% relative in every split", not bad,
                    f"worst {100 * worst_pts:.3f} points, {100 * worst_rel:.2f}% relative"
                    + (f"; bad {bad}" if bad else "")))

    absent = sorted(f"{q}/{s}" for q, size in overall.items() if size >= 10 for s in SPLITS if not per_split[s][q])
    results.append(("qtypes >= 10 present in every split", not absent, ", ".join(absent) or
                    f"{sum(1 for size in overall.values() if size >= 10)} qtypes checked"))

    for field in ("question", "answer"):
        for label, key in (("exact", lambda t: t), ("normalized", normalize_key)):
            seen = {s: {key(r[field]) for r in splits[s]} for s in SPLITS}
            shared = len((seen["train"] & seen["validation"]) | (seen["train"] & seen["test"])
                         | (seen["validation"] & seen["test"]))
            results.append((f"no {label} {field} text in two splits", shared == 0, f"{shared} shared"))

    ids = [r["id"] for s in SPLITS for r in splits[s]]
    results.append(("ids unique across all splits", len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} repeats"))
    return results


def rerun_identical(args: argparse.Namespace) -> tuple[str, bool, str]:
    differing = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in ("0", "4242"):
            out = Path(tmp) / f"split-{seed}"
            cmd = [sys.executable, "-m", "stages.split", "--params", args.params, "--prepared", args.prepared,
                   "--out", str(out), "--report", str(Path(tmp) / f"report-{seed}.json")]
            subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            differing += [f"{name} (PYTHONHASHSEED={seed})" for name in (f"{s}.jsonl" for s in SPLITS)
                          if not filecmp.cmp(out / name, Path(args.split) / name, shallow=False)]
    return ("byte-identical under other PYTHONHASHSEEDs", not differing, ", ".join(differing) or "0 and 4242 match")


def main(args: argparse.Namespace) -> int:
    splits = {s: read_jsonl(Path(args.split) / f"{s}.jsonl") for s in SPLITS}
    results = check(splits, args.min_kept)
    if args.rerun:
        results.append(rerun_identical(args))
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
