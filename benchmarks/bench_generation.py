"""Evaluation-stage generation at the GPU's pace: today's path against the candidates, one run, one table.

Every row goes through `stages.lib.evaluation.generation.generate_answers`, the evaluate stage's own function, with
the same prompts and decoding; rows differ only in KV cache, batch size and the n-gram blocker's implementation:

  today        dynamic cache, the per-row Python n-gram blocker it shipped with (stages/lib/testing/ngram_reference)
  dynamic      dynamic cache, the vectorized blocker (isolates what the blocker alone is worth)
  static:B     static cache at batch B: transformers compiles the decode step (CUDA graphs); first pass = cold
               (includes compiling), second = warm

New tokens are counted up to and including the first end-of-turn token. SmolLM2-135M: the real model
(models/base + an adapter, merged, eval.dtype) on the validation split (never test), and a match check: greedy
answers one question at a time (dynamic cache, eager: the reference) against each batched candidate on the
validation questions benchmarks/check_generation_match.py uses. Llama-3-8B: random weights of the real shape in NF4
(benchmarks/bench_gpu.build_model), random prompts with real MedQuAD prompt lengths: speed only.

    python -m benchmarks.bench_generation --shape smollm2-135m --params P --split data/split --base models/base \
        --adapter models/adapter --max-new-tokens 256 --no-repeat-ngram-size 4 --out $OUT/gen135m.json
    python -m benchmarks.bench_generation --shape llama3-8b --questions 256 --out $OUT/gen8b.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_generation")


class NoTextTokenizer:
    """Random-weight rows decode nothing: generate_answers needs a tokenizer only for pad ids and text."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


@contextlib.contextmanager
def loop_blocker():
    """Today's n-gram blocker in place of the vectorized one, for the `today` row only."""
    from stages.lib.evaluation import generation
    from stages.lib.testing.ngram_reference import LoopNGramBlocker

    kept = generation.AnswerNGramBlocker
    generation.AnswerNGramBlocker = LoopNGramBlocker
    try:
        yield
    finally:
        generation.AnswerNGramBlocker = kept


def parse_candidate(text: str, default_batch: int) -> tuple[str, str, int]:
    """'today' | 'dynamic' | 'static' with an optional ':batch' -> (name, kv cache, batch size)."""
    name, _, batch = text.partition(":")
    if name not in ("today", "dynamic", "static"):
        raise ValueError(f"unknown candidate {text!r} (today | dynamic | static, each optionally :batch)")
    return text, "static" if name == "static" else "dynamic", int(batch or default_batch)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_token_count(generations) -> int:
    return sum(len(g.token_ids) + int(g.hit_eos) for g in generations)


def timed_pass(model, tokenizer, prompts, decoding, batch, stops, kv_cache, today: bool):
    from stages.lib.evaluation.generation import generate_answers

    sync()
    start = time.perf_counter()
    with loop_blocker() if today else contextlib.nullcontext():
        gens = generate_answers(model, tokenizer, prompts, decoding, batch, stops, progress=False, kv_cache=kv_cache)
    sync()
    return gens, time.perf_counter() - start


def run_candidate(model, tokenizer, prompts, decoding, stops, spec: str, default_batch: int, passes: int) -> tuple:
    import torch

    name, kv_cache, batch = parse_candidate(spec, default_batch)
    row = {"candidate": name, "kv_cache": kv_cache, "batch_size": batch, "questions": len(prompts),
           "blocker": "per-row Python (today)" if name.startswith("today") else "vectorized"}
    gens = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        for k in range(passes):
            gens, seconds = timed_pass(model, tokenizer, prompts, decoding, batch, stops, kv_cache,
                                       name.startswith("today"))
            tokens = new_token_count(gens)
            label = "cold" if k == 0 else "warm"
            row[f"{label}_seconds"] = round(seconds, 2)
            row[f"{label}_new_tokens_per_s"] = round(tokens / seconds, 1)
            row["new_tokens"] = tokens
            log.info("%s (%s pass): %d new tokens in %.1f s = %.0f tokens/s", name, label, tokens, seconds,
                     tokens / seconds)
    except Exception as err:  # noqa: BLE001 - a candidate that fails is a row of the table, with its error
        log.exception("%s failed", name)
        row["error"] = f"{type(err).__name__}: {err}"[:600]
    if torch.cuda.is_available():
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["eos_rate"] = round(sum(g.hit_eos for g in gens) / len(gens), 3) if gens else None
    row["new_tokens_per_s"] = row.get("warm_new_tokens_per_s", row.get("cold_new_tokens_per_s"))
    return row, gens


def token_match(candidate, reference) -> dict:
    from benchmarks.check_generation_match import first_difference

    diffs = [first_difference(c.token_ids, r.token_ids) for c, r in zip(candidate, reference)]
    same = sum(d is None for d in diffs)
    return {"questions": len(diffs), "exact_match": same,
            "first_difference_at": sorted(d for d in diffs if d is not None)}


def load_real(args):
    """The 135M model as the evaluate stage loads it, the validation prompts and the eval decoding."""
    from stages.evaluate import select_questions
    from stages.lib.config import load_params
    from stages.lib.evaluation.generation import decoding_from_params
    from stages.lib.io import read_jsonl
    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids
    from stages.lib.model.loading import load_model_for_inference

    params = load_params(args.params, ("eval", "quant", "tokenize.system_prompt"))
    ev = params["eval"]
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens),
                                   ("no_repeat_ngram_size", args.no_repeat_ngram_size),
                                   ("repetition_penalty", args.repetition_penalty)) if v is not None}
    decoding = decoding_from_params(dataclasses.replace(ev, **overrides))
    model, tokenizer, precision = load_model_for_inference(args.base, args.adapter, params["quant"], merge=True,
                                                           dtype=ev.dtype)
    records = read_jsonl(Path(args.split) / "validation.jsonl")
    render = lambda recs: [render_prompt_ids(tokenizer, params["tokenize.system_prompt"], r["question"])  # noqa: E731
                           for r in recs]
    prompts = render(records[:args.questions] if args.questions else records)
    match_prompts = render(select_questions(records, args.match_questions, ev.seed, "validation")) \
        if args.match_questions else []
    info = {"model": "SmolLM2-135M-Instruct base + adapter (merged)", "precision": precision.as_dict(),
            "prompts": f"validation split, {len(prompts)} of {len(records)} questions"}
    return model, tokenizer, end_of_turn_ids(tokenizer), decoding, prompts, match_prompts, info


def load_random_8b(args):
    import random

    from benchmarks.bench_gpu import SHAPES, build_model, load_lengths, make_prompts
    from stages.lib.evaluation.generation import Decoding

    cfg = SHAPES["llama3-8b"]
    model = build_model("llama3-8b", "cuda", "bfloat16", "nf4", "uint8", "sdpa", args.seed, 0.02)
    model.config.use_cache = True
    model.eval()
    pairs, _ = load_lengths(ROOT / "benchmarks" / "lengths.json", args.seed)
    random.Random(args.seed).shuffle(pairs)
    prompts = make_prompts(pairs[:args.questions or 256], cfg["vocab_size"], args.seed)
    decoding = Decoding(max_new_tokens=args.max_new_tokens or 256, repetition_penalty=args.repetition_penalty or 1.0,
                        no_repeat_ngram_size=args.no_repeat_ngram_size or 0)
    info = {"model": "Llama-3-8B shape, random weights, NF4 (bitsandbytes, bf16 compute)",
            "prompts": f"{len(prompts)} random-token prompts with real MedQuAD prompt lengths"}
    return model, NoTextTokenizer(cfg["pad_token_id"]), {cfg["eos_token_id"]}, decoding, prompts, [], info


def profile_candidate(model, tokenizer, prompts, decoding, stops, spec: str, default_batch: int, out: Path) -> None:
    """torch.profiler over one batch of a candidate (after a warm-up batch): where a decoding step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    name, kv_cache, batch = parse_candidate(spec, default_batch)
    short = dataclasses.replace(decoding, max_new_tokens=32)
    timed_pass(model, tokenizer, prompts[:batch], short, batch, stops, kv_cache, name.startswith("today"))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_pass(model, tokenizer, prompts[:batch], short, batch, stops, kv_cache, name.startswith("today"))
        torch.cuda.synchronize()
    averages = prof.key_averages()
    out.write_text("\n\n".join(averages.table(sort_by=key, row_limit=40)
                                for key in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total")))
    log.info("profile of %s written to %s", name, out)


def save_reference(gens, path: Path) -> None:
    path.write_text(json.dumps([[list(g.token_ids), g.hit_eos] for g in gens]))


def load_reference(path: Path):
    from stages.lib.evaluation.generation import Generation

    return [Generation(text="", token_ids=tuple(ids), hit_eos=hit) for ids, hit in json.loads(path.read_text())]


def versions() -> dict:
    from importlib import metadata

    import torch

    out = {}
    for lib in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    out["cuda"] = torch.version.cuda
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def main(args) -> dict:
    loader = load_real if args.shape == "smollm2-135m" else load_random_8b
    model, tokenizer, stops, decoding, prompts, match_prompts, info = loader(args)
    log.info("decoding %s; %d prompts", decoding, len(prompts))
    if args.profile:
        for spec in args.profile:
            profile_candidate(model, tokenizer, prompts, decoding, stops, spec, args.batch_size,
                              Path(args.profile_dir) / f"profile-{spec.replace(':', '-')}.txt")
    rows = []
    for spec in args.candidates:
        passes = 2 if spec.startswith("static") else 1
        row, _ = run_candidate(model, tokenizer, prompts, decoding, stops, spec, args.batch_size, passes)
        rows.append(row)
    base = next((r for r in rows if r["candidate"].startswith("today") and "error" not in r), None)
    for row in rows:
        if base and row.get("new_tokens_per_s"):
            row["speedup_vs_today"] = round(row["new_tokens_per_s"] / base["new_tokens_per_s"], 2)
    match = {}
    if match_prompts:
        match_decoding = dataclasses.replace(decoding, max_new_tokens=args.match_max_new_tokens)
        if args.reference_in:  # the one-at-a-time answers of an earlier run of this command (same card, versions)
            reference = load_reference(Path(args.reference_in))
            match["reference"] = {"what": f"one question at a time, dynamic cache, eager: {args.reference_in}",
                                  "max_new_tokens": args.match_max_new_tokens}
        else:
            reference, seconds = timed_pass(model, tokenizer, match_prompts, match_decoding, 1, stops, "dynamic",
                                            False)
            match["reference"] = {"what": "one question at a time, dynamic cache, eager", "seconds": round(seconds, 1),
                                  "new_tokens_per_s": round(new_token_count(reference) / seconds, 1),
                                  "max_new_tokens": args.match_max_new_tokens}
            if args.reference_out:
                save_reference(reference, Path(args.reference_out))
        for spec in args.match_candidates:
            name, kv_cache, batch = parse_candidate(spec, args.batch_size)
            gens, seconds = timed_pass(model, tokenizer, match_prompts, match_decoding, batch, stops, kv_cache,
                                       name.startswith("today"))
            match[name] = token_match(gens, reference)
            log.info("match %s: %d of %d identical", name, match[name]["exact_match"], len(gens))
    report = {"bench": "generation", "shape": args.shape, "date": time.strftime("%Y-%m-%d"), **info,
              "decoding": dataclasses.asdict(decoding), "rows": rows, "match": match, "versions": versions(),
              "command": args.command}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv=None):
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["smollm2-135m", "llama3-8b"], default="smollm2-135m")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--split", default=str(ROOT / "data" / "split"))
    ap.add_argument("--base", default=str(ROOT / "models" / "base"))
    ap.add_argument("--adapter", default=str(ROOT / "models" / "adapter"))
    ap.add_argument("--questions", type=int, default=None, help="prompts timed (default: the whole validation split)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=128, help="batch of a candidate without ':batch'")
    ap.add_argument("--candidates", nargs="*", default=["today", "dynamic", "static:128", "static:256", "static:512"])
    ap.add_argument("--match-questions", type=int, default=96)
    ap.add_argument("--match-max-new-tokens", type=int, default=128, help="as check_generation_match's run")
    ap.add_argument("--match-candidates", nargs="+", default=["today", "static:256"])
    ap.add_argument("--reference-out", default=None, help="save the one-at-a-time answers (token ids) here")
    ap.add_argument("--reference-in", default=None, help="compare with saved one-at-a-time answers instead")
    ap.add_argument("--profile", nargs="*", default=[], help="candidates to profile (one short batch each)")
    ap.add_argument("--profile-dir", default=".")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.command = "python -m benchmarks.bench_generation " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.shape == "llama3-8b":
        args.match_questions = 0
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(parse_args())
