"""Write benchmarks/lengths.json: (prompt_len, answer_len) of every train example, as the train stage tokenizes it.

The benchmark draws its example lengths from this file so padding waste is the real one. Tokenized like
stages/tokenize.py (stages.lib.model.chat.encode_example, the params' system prompt) but capped at 1024 tokens, not at
tokenize.max_length, because the benchmark compares recipes at the references' 1024-token cap.

    python -m tools.make_lengths --split data/split/train.jsonl --base models/base --params params.yaml \
        --out benchmarks/lengths.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("make_lengths")


def measure_lengths(tokenizer, system_prompt: str, records, max_length: int) -> tuple[list[list[int]], dict]:
    """[[prompt_len, answer_len], ...] in record order, plus counts of what was dropped or cut."""
    from stages.lib.model.chat import encode_example

    pairs, counts = [], {"examples": 0, "dropped_prompt_too_long": 0, "truncated": 0}
    for rec in records:
        counts["examples"] += 1
        ex = encode_example(tokenizer, system_prompt, rec["question"], rec["answer"], max_length)
        if ex is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        counts["truncated"] += int(ex.truncated)
        pairs.append([ex.prompt_len, len(ex.input_ids) - ex.prompt_len])
    return pairs, counts


def main(args) -> None:
    from stages.lib.config import load_params
    from stages.lib.io import atomic_file, read_jsonl
    from stages.lib.model.loading import load_tokenizer

    split = Path(args.split)
    if split.is_dir():
        split = split / "train.jsonl"
    tokenize = load_params(args.params, ("tokenize",))["tokenize"]
    tokenizer = load_tokenizer(args.base)
    pairs, counts = measure_lengths(tokenizer, tokenize.system_prompt, read_jsonl(split), args.max_length)
    if not pairs:
        raise SystemExit(f"no example of {split} fits {args.max_length} tokens")
    totals = sorted(p + a for p, a in pairs)
    stats = {"median_total": totals[len(totals) // 2], "mean_total": round(sum(totals) / len(totals), 1),
             "max_total": totals[-1]}
    header = {"tokenizer": f"{Path(args.base).name} ({type(tokenizer).__name__}, vocab {len(tokenizer)})",
              "source": str(split), "max_length": args.max_length, **counts, **stats}
    with atomic_file(args.out) as fh:  # one pair per line: small, and diffs stay readable
        fh.write(json.dumps(header, indent=1)[:-2] + ',\n "pairs": [\n')
        fh.write(",\n".join(json.dumps(p) for p in pairs) + "\n]}\n")
    log.info("wrote %s: %d pairs, %s, %s", args.out, len(pairs), counts, stats)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="data/split/train.jsonl", help="train.jsonl of the split stage (or its dir)")
    ap.add_argument("--base", default="models/base", help="models/base (its tokenizer and chat template)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "lengths.json"))
    return ap.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    main(parse_args())
