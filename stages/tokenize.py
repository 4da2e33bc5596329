"""Stage tokenize: chat-render and tokenize the train/validation splits with completion-only labels.

    python -m stages.tokenize --params params.yaml --split data/split --base models/base \
        --out data/tokenized --report reports/tokenize.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.model.chat import IGNORE_INDEX, check_prompt_format, encode_example, end_of_turn_ids
from stages.lib.config import load_params
from stages.lib.io import atomic_dir, read_jsonl, run_metadata, setup_logging, write_json
from stages.lib.data.sampling import stratified_sample
from stages.lib.versions import check_versions

PARAMS = ("tokenize", "model.prompt_format")
LIBRARIES = ("transformers", "tokenizers", "datasets", "tqdm")
# The splits training reads, with the param that caps each; test stays raw text for evaluate.
SPLITS = (("train", "max_train_samples"), ("validation", "max_eval_samples"))
# Share of examples whose prompt alone overflows max_length above which the stage fails instead of dropping them.
MAX_DROPPED_FRACTION = 0.05

log = logging.getLogger("stages.tokenize")


def length_summary(lengths: list[int]) -> dict:
    """Nearest-rank percentiles of token lengths (what max_length trades off)."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def encode_records(tokenizer, records: list[dict], system_prompt: str, max_length: int,
                   prompt_format: str = "chat") -> tuple[dict, dict]:
    """Columns (id, qtype, input_ids, labels) for the records that fit, and counts of what happened."""
    from tqdm.auto import tqdm

    columns: dict[str, list] = {"id": [], "qtype": [], "input_ids": [], "labels": []}
    dropped, truncated, with_eos = [], 0, 0
    lengths, answer_tokens = [], 0
    stops = end_of_turn_ids(tokenizer, prompt_format)
    for rec in tqdm(records, desc="tokenize", unit="ex", mininterval=2.0):
        enc = encode_example(tokenizer, system_prompt, rec["question"], rec["answer"], max_length, prompt_format)
        if enc is None:
            dropped.append(rec["id"])  # the prompt alone leaves no room for an answer token
            continue
        columns["id"].append(str(rec["id"]))
        columns["qtype"].append(str(rec.get("qtype")))
        columns["input_ids"].append(enc.input_ids)
        columns["labels"].append(enc.labels)
        truncated += enc.truncated
        with_eos += enc.labels[-1] in stops
        lengths.append(len(enc.input_ids))
        answer_tokens += sum(1 for t in enc.labels if t != IGNORE_INDEX)
    stats = {
        "examples": len(columns["input_ids"]),
        "truncated": truncated,
        "with_end_of_turn": with_eos,
        "dropped_prompt_too_long": len(dropped),
        "dropped_ids": dropped[:20],
        "answer_tokens": answer_tokens,
        "token_length": length_summary(lengths),
    }
    return columns, stats


def main(args) -> dict:
    setup_logging()
    check_versions(LIBRARIES)
    loaded = load_params(args.params, PARAMS)
    params, prompt_format = loaded["tokenize"], loaded["model.prompt_format"]
    from datasets import Dataset, Features, Sequence, Value
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    check_prompt_format(tokenizer, prompt_format, f"the tokenizer in {args.base}")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in end_of_turn_ids(tokenizer):
        raise ValueError(f"{args.base}: pad token {tokenizer.pad_token!r} is missing or an end-of-turn token; "
                         "rerun the base_model stage")
    features = Features({"id": Value("string"), "qtype": Value("string"),
                         "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    report: dict = {"max_length": params.max_length, "prompt_format": prompt_format, "splits": {}}
    with atomic_dir(args.out) as tmp:
        for split, cap_name in SPLITS:
            records = read_jsonl(Path(args.split) / f"{split}.jsonl")
            if not records:
                raise ValueError(f"{args.split}/{split}.jsonl is empty")
            sample = stratified_sample(records, getattr(params, cap_name), key="qtype", seed=params.seed)
            columns, stats = encode_records(tokenizer, sample, params.system_prompt, params.max_length,
                                            prompt_format)
            if stats["dropped_prompt_too_long"] > MAX_DROPPED_FRACTION * len(sample):
                raise ValueError(f"{split}: {stats['dropped_prompt_too_long']} of {len(sample)} prompts alone exceed "
                                 f"tokenize.max_length={params.max_length} (e.g. ids {stats['dropped_ids'][:5]}); "
                                 "raise max_length")
            Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / split))
            report["splits"][split] = {"records": len(records), "sampled": len(sample), **stats}
            log.info("%s: %d of %d records kept, %d truncated, %d dropped (prompt too long), lengths %s",
                     split, stats["examples"], len(records), stats["truncated"],
                     stats["dropped_prompt_too_long"], stats["token_length"])
    report["metadata"] = run_metadata()
    write_json(args.report, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", required=True, help="folder with train/validation .jsonl (data/split)")
    parser.add_argument("--base", required=True, help="base model folder whose tokenizer to use (models/base)")
    parser.add_argument("--out", required=True, help="folder for the tokenized datasets (data/tokenized)")
    parser.add_argument("--report", required=True, help="JSON metrics file (reports/tokenize.json)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
