"""Stage evaluate: answer the eval.split questions (test, or validation to choose) with one model and score the
reference answers under it.

Run twice by dvc.yaml: without --adapter (the base model) and with it (base + LoRA), so base predictions stay
cached when only training changes. Writes one JSON line per question (id, qtype, prediction, n_new_tokens, hit_eos,
ref_nll_sum, ref_n_tokens, ref_truncated) and a summary JSON (speed, stop rate, perplexity, versions). Metrics
against the references are computed in `compare`, which sees both models' outputs.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from stages.lib.config import load_params, name_params_on_oom
from stages.lib.io import read_jsonl, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.data.sampling import stratified_sample
from stages.lib.versions import check_versions

log = logging.getLogger("stages.evaluate")

PARAMS = ("eval", "tokenize.system_prompt", "quant", "model.prompt_format")
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "bitsandbytes", "safetensors",
             "tqdm")


def select_questions(records: list[dict], max_samples: int | None, seed: int, split: str = "test") -> list[dict]:
    """The evaluated subset of a split: stratified by qtype with a fixed seed, after checking the records."""
    if not records:
        raise ValueError(f"the {split} split is empty")
    for i, rec in enumerate(records):
        missing = [k for k in ("id", "question", "answer", "qtype") if not rec.get(k)]
        if missing:
            raise ValueError(f"{split} record {i} (id {rec.get('id')!r}) lacks {', '.join(missing)}")
    ids = [rec["id"] for rec in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{split} ids are not unique")
    return stratified_sample(records, max_samples, key="qtype", seed=seed)


def context_window(model) -> int:
    """Longest sequence the model takes; the reference answers are scored whole up to it."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        raise ValueError("the model config has no max_position_embeddings; cannot size the answer scoring")
    return int(limit)


def build_rows(records: list[dict], generations, scores, encoded) -> list[dict]:
    return [{
        "id": rec["id"],
        "qtype": rec["qtype"],
        "prediction": gen.text,
        "n_new_tokens": len(gen.token_ids),  # answer tokens before the end-of-turn token
        "hit_eos": gen.hit_eos,
        "ref_nll_sum": score.nll_sum,
        "ref_n_tokens": score.n_tokens,
        "ref_truncated": enc.truncated,
    } for rec, gen, score, enc in zip(records, generations, scores, encoded)]


def summarize(rows: list[dict], gen_seconds: float, score_seconds: float) -> dict:
    from stages.lib.evaluation.bootstrap import perplexity

    new_tokens = sum(r["n_new_tokens"] + r["hit_eos"] for r in rows)
    return {
        "n_questions": len(rows),
        "mean_new_tokens": sum(r["n_new_tokens"] for r in rows) / len(rows),
        "eos_rate": sum(r["hit_eos"] for r in rows) / len(rows),
        "generation_seconds": round(gen_seconds, 2),
        "new_tokens_per_s": round(new_tokens / max(gen_seconds, 1e-9), 2),
        "scoring_seconds": round(score_seconds, 2),
        "ref_tokens": sum(r["ref_n_tokens"] for r in rows),
        "ref_truncated": sum(r["ref_truncated"] for r in rows),
        "perplexity": perplexity([r["ref_nll_sum"] for r in rows], [r["ref_n_tokens"] for r in rows]),
    }


def main(args: argparse.Namespace) -> None:
    from stages.lib.model.chat import (check_prompt_format, check_recorded_format, encode_example, end_of_turn_ids,
                                       render_prompt_ids)
    from stages.lib.evaluation.generation import decoding_from_params, generate_answers, pad_id_for, score_answers
    from stages.lib.model.loading import load_model_for_inference

    params = load_params(args.params, PARAMS)
    check_versions(LIBRARIES, params)
    ev, system_prompt, prompt_format = params["eval"], params["tokenize.system_prompt"], params["model.prompt_format"]
    if args.adapter:  # before any model is loaded; the marker is the file train writes beside the adapter
        check_recorded_format(args.adapter, prompt_format)
    path = Path(args.split) / f"{ev.split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {ev.split} split at {path} (run `dvc repro split` first)")
    questions = read_jsonl(path)
    records = select_questions(questions, ev.max_samples, ev.seed, ev.split)
    name = "finetuned" if args.adapter else "base"
    log.info("evaluating %s on %d of %d %s questions", name, len(records), len(questions), ev.split)

    model, tokenizer, precision = load_model_for_inference(args.base, args.adapter, params["quant"], merge=True,
                                                           dtype=params["eval"].dtype)
    check_prompt_format(tokenizer, prompt_format, f"the tokenizer in {args.base}")
    stops = end_of_turn_ids(tokenizer, prompt_format)
    prompts = [render_prompt_ids(tokenizer, system_prompt, rec["question"], prompt_format=prompt_format)
               for rec in records]
    start = time.perf_counter()
    with name_params_on_oom("generating", f"lower eval.batch_size (now {ev.batch_size}) or eval.max_new_tokens"):
        generations = generate_answers(model, tokenizer, prompts, decoding_from_params(ev), ev.batch_size, stops,
                                       kv_cache=ev.kv_cache)
    gen_seconds = time.perf_counter() - start

    limit = context_window(model)
    encoded = [encode_example(tokenizer, system_prompt, rec["question"], rec["answer"], limit, prompt_format)
               for rec in records]
    unscorable = [rec["id"] for rec, enc in zip(records, encoded) if enc is None]
    if unscorable:
        raise ValueError(f"{len(unscorable)} prompt(s) fill the {limit}-token context, e.g. {unscorable[:3]}")
    pad_id = pad_id_for(tokenizer, stops)
    start = time.perf_counter()
    with name_params_on_oom("scoring the reference answers", f"lower eval.batch_size (now {ev.batch_size})"):
        scores = score_answers(model, encoded, ev.batch_size, pad_id)
    score_seconds = time.perf_counter() - start

    rows = build_rows(records, generations, scores, encoded)
    summary = {"model": name, "split": ev.split, "n_split": len(questions),
               **summarize(rows, gen_seconds, score_seconds), "precision": precision.as_dict(), "kv_cache": ev.kv_cache,
               "context_window": limit, **run_metadata()}
    log.info("%s: perplexity %.3f, %.0f%% stopped by end-of-turn, %.1f new tokens/s, %d reference answers cut "
             "at the context window", name, summary["perplexity"], 100 * summary["eos_rate"],
             summary["new_tokens_per_s"], summary["ref_truncated"])
    write_jsonl(args.out, rows)
    write_json(args.summary, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--split", required=True, help="folder holding test.jsonl and validation.jsonl")
    parser.add_argument("--base", required=True, help="base model folder (models/base)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder; omit to evaluate the base model")
    parser.add_argument("--out", required=True, help="per-question JSONL output")
    parser.add_argument("--summary", required=True,
                        help="summary JSON: counts, speed, precision, provenance (uncached report)")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
