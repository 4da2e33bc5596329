"""Stage mcq: score every option of the multiple-choice questions by log-likelihood under one model.

Run twice by dvc.yaml, as evaluate is: without --adapter (mcq_base) and with it (mcq_finetuned), so a LoRA change
never rescores the base. Writes one JSON line per question (id, suite, subject, answer_index, each option's summed
log-probability and token count) and a summary JSON (time, tokens, precision, versions); accuracies, CIs and the
paired difference are computed by mcq_compare, which sees both.
"""

from __future__ import annotations

import argparse
import logging
import time

from stages.lib.config import load_params, name_params_on_oom
from stages.lib.io import read_jsonl, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.versions import check_versions

log = logging.getLogger("stages.mcq")

PARAMS = ("tokenize.system_prompt", "quant", "model.prompt_format")
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "bitsandbytes", "safetensors", "tqdm")


def main(args: argparse.Namespace) -> None:
    from stages.lib.data.mcq import question_text
    from stages.lib.evaluation.mcq import score_records
    from stages.lib.model.chat import check_prompt_format, check_recorded_format
    from stages.lib.model.loading import load_model_for_inference

    params = load_params(args.params, PARAMS)
    check_versions(LIBRARIES, params)
    system_prompt, prompt_format = params["tokenize.system_prompt"], params["model.prompt_format"]
    if args.adapter:  # before any model is loaded
        check_recorded_format(args.adapter, prompt_format)
    questions = read_jsonl(args.questions)
    if not questions:
        raise ValueError(f"no questions in {args.questions} (run `dvc repro prepare_mcq`)")
    name = "finetuned" if args.adapter else "base"
    model, tokenizer, precision = load_model_for_inference(args.base, args.adapter, params["quant"], merge=True)
    check_prompt_format(tokenizer, prompt_format, f"the tokenizer in {args.base}")
    window = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if window < 1:
        raise ValueError("the model config has no max_position_embeddings; cannot check prompt lengths")
    log.info("scoring %d questions with the %s model", len(questions), name)
    start = time.perf_counter()
    with name_params_on_oom("scoring options", "lower mcq.k_shot or mcq.max_samples"):
        rows = score_records(model, tokenizer, questions, {q["id"]: q["shots"] for q in questions}, system_prompt,
                             prompt_format, question_text, window, desc=f"mcq {name}")
    seconds = time.perf_counter() - start
    tokens = sum(r["prompt_tokens"] + sum(r["n_tokens"]) for r in rows)
    summary = {"model": name, "n_questions": len(rows), "seconds": round(seconds, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "precision": precision.as_dict(),
               **run_metadata()}
    log.info("%s: %d questions in %.1f s (%.0f tokens/s)", name, len(rows), seconds, summary["tokens_per_s"])
    write_jsonl(args.out, rows)
    write_json(args.summary, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--questions", required=True, help="prepare_mcq's questions JSONL")
    parser.add_argument("--base", required=True, help="base model folder (models/base)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder; omit to score the base model")
    parser.add_argument("--out", required=True, help="per-question scores JSONL")
    parser.add_argument("--summary", required=True, help="summary JSON: time, tokens, precision (uncached report)")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
