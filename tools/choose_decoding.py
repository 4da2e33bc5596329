"""Choose eval.max_new_tokens, eval.repetition_penalty and eval.no_repeat_ngram_size without touching the test split.

1. Token lengths of the *training* answers (overall and per qtype): how much of a typical answer a budget covers.
2. A few decoding settings compared on a stratified *validation* subset: ROUGE-1/2/L/Lsum, BLEU, length ratio,
   how often the model ends its answer itself, how often it loops (a sentence said three times), and speed. Greedy
   answers under a budget of N tokens are the first N tokens of the answers under a larger budget (every processor
   here looks only at the tokens so far), so each (penalty, n-gram size) pair is generated once, at the largest budget.

    python -m tools.choose_decoding --params params.yaml --train data/split/train.jsonl \
        --validation data/split/validation.jsonl --base models/base [--adapter models/adapter] \
        --n 96 --max-new-tokens 96,128,160,256 --repetition-penalty 1.0,1.1 --no-repeat-ngram-size 0,3,4 \
        [--out result.json]

Prints tables (the one place this project prints); --out also writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from stages.lib.config import load_params
from stages.lib.io import read_jsonl, run_metadata, setup_logging, write_json
from stages.lib.data.sampling import stratified_sample

log = logging.getLogger("tools.choose_decoding")

PARAMS = ("eval", "tokenize.system_prompt", "quant", "model.prompt_format")
PERCENTILES = (50, 75, 90, 95)


def length_stats(lengths: list[int], budgets: list[int]) -> dict:
    arr = np.asarray(lengths)
    stats = {"n": int(arr.size), "mean": round(float(arr.mean()), 1), "max": int(arr.max())}
    stats.update({f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES})
    # Share of answers a budget holds whole (answer + end-of-turn token).
    stats.update({f"fits_{b}": round(float((arr <= b).mean()), 3) for b in budgets})
    return stats


def answer_token_lengths(tokenizer, records: list[dict]) -> list[int]:
    ids = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [len(x) + 1 for x in ids]  # + the end-of-turn token the model must also produce


def print_table(title: str, rows: list[dict]) -> None:
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(str(c).rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def main(args: argparse.Namespace) -> dict:
    import evaluate

    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids
    from stages.lib.evaluation.generation import decoding_from_params, generate_answers
    from stages.lib.model.loading import load_model_for_inference

    if "test" in Path(args.validation).name or "test" in Path(args.train).name:
        raise ValueError("decoding is chosen on train/validation only; pass the validation and train splits")
    params = load_params(args.params, PARAMS)
    ev, system_prompt, prompt_format = params["eval"], params["tokenize.system_prompt"], params["model.prompt_format"]
    budgets = sorted(int(x) for x in args.max_new_tokens.split(","))
    penalties = [float(x) for x in args.repetition_penalty.split(",")]
    ngram_sizes = [int(x) for x in args.no_repeat_ngram_size.split(",")]

    model, tokenizer, _ = load_model_for_inference(args.base, args.adapter, params["quant"], merge=True)  # as evaluate
    train = read_jsonl(args.train)
    lengths = answer_token_lengths(tokenizer, train)
    by_qtype = defaultdict(list)
    for rec, n in zip(train, lengths):
        by_qtype[rec["qtype"]].append(n)
    length_rows = [{"qtype": "ALL", **length_stats(lengths, budgets)}]
    length_rows += [{"qtype": q, **length_stats(v, budgets)} for q, v in sorted(by_qtype.items())]
    print_table("Train answer lengths (tokens, incl. end-of-turn)", length_rows)

    records = stratified_sample(read_jsonl(args.validation), args.n, key="qtype", seed=ev.seed)
    prompts = [render_prompt_ids(tokenizer, system_prompt, r["question"], prompt_format=prompt_format)
               for r in records]
    references = [r["answer"] for r in records]
    stops = end_of_turn_ids(tokenizer, prompt_format)
    metric = evaluate.load(args.metric)
    decode_rows = []
    for penalty, ngram in ((p, n) for p in penalties for n in ngram_sizes):
        # The eval params with these three replaced (replace re-validates), built as evaluate builds its Decoding.
        decoding = decoding_from_params(dataclasses.replace(ev, max_new_tokens=budgets[-1], repetition_penalty=penalty,
                                                            no_repeat_ngram_size=ngram))
        start = time.perf_counter()
        gens = generate_answers(model, tokenizer, prompts, decoding, ev.batch_size, stops)
        seconds = time.perf_counter() - start
        new_tokens = sum(len(g.token_ids) + g.hit_eos for g in gens)
        for budget in budgets:
            # Ended itself within the budget = produced end-of-turn within `budget` new tokens.
            ended = [g.hit_eos and len(g.token_ids) < budget for g in gens]
            texts = [tokenizer.decode(g.token_ids[:budget], skip_special_tokens=True).strip() for g in gens]
            scores = metric.compute(predictions=texts, references=references)
            decode_rows.append({
                "repetition_penalty": penalty, "no_repeat_ngram_size": ngram, "max_new_tokens": budget,
                "rouge1": round(scores["rouge1"], 4), "rouge2": round(scores["rouge2"], 4),
                "rougeL": round(scores["rougeL"], 4), "rougeLsum": round(scores["rougeLsum"], 4),
                "bleu": round(scores["bleu"], 4), "length_ratio": round(scores["length_ratio"], 3),
                "ended_itself": round(sum(ended) / len(ended), 3), "loop_rate": round(scores["loop_rate"], 3),
                "new_tok_s_at_max": round(new_tokens / seconds, 1),
            })
    print_table(f"Decoding on {len(records)} validation questions (greedy)", decode_rows)
    result = {"train_answer_lengths": length_rows, "decoding": decode_rows, "n_validation": len(records),
              "model": "finetuned" if args.adapter else "base", **run_metadata()}
    if args.out:
        write_json(args.out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--train", required=True, help="train split JSONL (answer-length statistics)")
    parser.add_argument("--validation", required=True, help="validation split JSONL (decoding comparison)")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (compare the fine-tuned model)")
    parser.add_argument("--metric", default="stages/lib/evaluation/medqa_metric", help="evaluate metric module folder")
    parser.add_argument("--n", type=int, default=32, help="validation questions (stratified by qtype)")
    parser.add_argument("--max-new-tokens", default="96,128,160,256", help="comma-separated budgets")
    parser.add_argument("--repetition-penalty", default="1.0,1.1", help="comma-separated penalties")
    parser.add_argument("--no-repeat-ngram-size", default="0", help="comma-separated n-gram sizes (0 = off)")
    parser.add_argument("--out", default=None, help="optional JSON copy of the tables")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
