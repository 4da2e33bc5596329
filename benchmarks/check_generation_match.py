"""Batched generation (what the evaluate stage does) against one question at a time, on the real model.

Same model, same decoding (params.yaml `eval`), same prompts; only the batching differs. Reports the share of
questions whose greedy answers are identical token for token, where the others first differ, and new tokens/s of
each way. Validation questions only (never test):

    python -m benchmarks.check_generation_match --questions 32 --max-new-tokens 128     # CPU default, ~4 min
    python -m benchmarks.check_generation_match --dtype bfloat16 ...                     # the GPU precision
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("check_generation_match")


def first_difference(a, b) -> int | None:
    """Index of the first differing token (or the shorter length), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(batched, single) -> dict:
    diffs = [first_difference(b.token_ids, s.token_ids) for b, s in zip(batched, single)]
    same = sum(d is None for d in diffs)
    return {"questions": len(diffs), "exact_match": same, "exact_match_rate": round(same / len(diffs), 4),
            "first_difference_at": sorted(d for d in diffs if d is not None)}


def main(args) -> dict:
    import torch

    from stages.evaluate import select_questions
    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids
    from stages.lib.config import load_params
    from stages.lib.evaluation.generation import decoding_from_params, generate_answers
    from stages.lib.io import read_jsonl
    from stages.lib.model.loading import load_model_for_inference

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, ("eval", "quant", "tokenize.system_prompt"))
    ev = params["eval"]
    records = select_questions(read_jsonl(Path(args.split) / "validation.jsonl"), args.questions, ev.seed)
    model, tokenizer, precision = load_model_for_inference(args.base, args.adapter, params["quant"], merge=True,
                                                           dtype=args.dtype or ev.dtype)
    stops = end_of_turn_ids(tokenizer)
    prompts = [render_prompt_ids(tokenizer, params["tokenize.system_prompt"], r["question"]) for r in records]
    decoding = decoding_from_params(ev)
    if args.max_new_tokens:
        decoding = dataclasses.replace(decoding, max_new_tokens=args.max_new_tokens)
    # warm-up (CUDA context, kernels, allocator) so that neither way pays it inside its timing
    generate_answers(model, tokenizer, prompts[:2], dataclasses.replace(decoding, max_new_tokens=8), 2, stops)
    timings = {}
    results = {}
    for name, batch in (("batched", args.batch_size or ev.batch_size), ("one_at_a_time", 1)):
        start = time.perf_counter()
        results[name] = generate_answers(model, tokenizer, prompts, decoding, batch, stops)
        seconds = time.perf_counter() - start
        new = sum(len(g.token_ids) + g.hit_eos for g in results[name])
        timings[name] = {"batch_size": batch, "seconds": round(seconds, 1), "new_tokens": new,
                         "new_tokens_per_s": round(new / seconds, 2)}
    report = {"model": "base + adapter" if args.adapter else "base", "dtype": precision.dtype,
              "precision": precision.as_dict(), "merged": not hasattr(model, "peft_config"),
              "device": precision.device,
              "gpu": torch.cuda.get_device_name(0) if precision.device == "cuda" else None,
              "max_new_tokens": decoding.max_new_tokens,
              "timings": timings, "speedup": round(timings["batched"]["new_tokens_per_s"]
                                                   / timings["one_at_a_time"]["new_tokens_per_s"], 2),
              **compare(results["batched"], results["one_at_a_time"])}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.answers_out:
        # both ways' answers beside the reference, so the metrics of each can be compared (ROUGE-L, BLEU) elsewhere
        with open(args.answers_out, "w", encoding="utf-8") as fh:
            for rec, b, s in zip(records, results["batched"], results["one_at_a_time"]):
                fh.write(json.dumps({"id": rec["id"], "qtype": rec["qtype"], "reference": rec["answer"],
                                     "batched": b.text, "one_at_a_time": s.text,
                                     "identical": b.token_ids == s.token_ids}) + "\n")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--split", default=str(ROOT / "data" / "split"))
    parser.add_argument("--base", default=str(ROOT / "models" / "base"))
    parser.add_argument("--adapter", default=str(ROOT / "models" / "adapter"), help="'' for the base model alone")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: params.yaml eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml eval.batch_size")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="eval.dtype for this check (default: params.yaml's, as the evaluate stage)")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    parser.add_argument("--answers-out", default=None, help="write each question's answers both ways here (JSONL)")
    args = parser.parse_args(argv)
    args.adapter = args.adapter or None
    return args


if __name__ == "__main__":
    main(parse_args())
