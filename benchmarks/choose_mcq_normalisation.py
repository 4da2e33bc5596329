"""Choose mcq.headline (raw vs per_token option log-likelihood) on non-test pools only: MMLU's val split (123) and
PubMedQA's non-test half. Never reads a test question.

    python -m benchmarks.choose_mcq_normalisation --datasets ../shared/datasets --base models/base \
        --adapter models/adapter --out benchmarks/results/<date>-cpu-mcq-normalisation.json

Rule, fixed before running: the normalisation with the higher accuracy averaged over base and fine-tuned on the
pooled non-test questions; a tie keeps raw.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.data.mcq import SUITE_DATASETS, question_text, read_suite
from stages.lib.data.sampling import stratified_sample
from stages.lib.evaluation.mcq import score_records
from stages.lib.evaluation.mcq_metrics import NORMALISATIONS, accuracy_ci, predict
from stages.lib.evaluation.bootstrap import paired_bootstrap_ci
from stages.lib.io import run_metadata, setup_logging, write_json
from stages.lib.model.loading import load_model_for_inference

log = logging.getLogger("benchmarks.choose_mcq_normalisation")


def choose_pool(datasets: Path, pubmedqa_max: int | None, seed: int) -> list[dict]:
    mmlu, _ = read_suite("mmlu", datasets / SUITE_DATASETS["mmlu"])
    pubmed, _ = read_suite("pubmedqa", datasets / SUITE_DATASETS["pubmedqa"])
    pool = [r for r in mmlu if r["pool"] == "choose"]
    pool += stratified_sample([r for r in pubmed if r["pool"] == "shots"], pubmedqa_max, "subject", seed)
    assert not [r for r in pool if r["pool"] == "test"]
    return pool


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params, ("tokenize.system_prompt", "model.prompt_format", "quant", "mcq"))
    pool = choose_pool(Path(args.datasets), args.pubmedqa_max, params["mcq"].seed)
    out = {"pool": {s: sum(r["suite"] == s for r in pool) for s in ("mmlu", "pubmedqa")}, "models": {}}
    correct = {}
    for name, adapter in (("base", None), ("finetuned", args.adapter)):
        model, tok, _ = load_model_for_inference(args.base, adapter, params["quant"], merge=True)
        start = time.perf_counter()
        rows = score_records(model, tok, pool, {}, params["tokenize.system_prompt"], params["model.prompt_format"],
                             question_text, model.config.max_position_embeddings, desc=name)
        seconds = time.perf_counter() - start
        result = {"seconds": round(seconds, 1)}
        for suite in ("mmlu", "pubmedqa", "all"):
            sel = [r for r in rows if suite in ("all", r["suite"])]
            result[suite] = {}
            for norm in NORMALISATIONS:
                hits = [float(predict(r, norm) == r["answer_index"]) for r in sel]
                correct[(name, suite, norm)] = hits
                result[suite][norm] = accuracy_ci(hits, 2000, params["mcq"].seed)
            result[suite]["per_token_minus_raw"] = paired_bootstrap_ci(
                correct[(name, suite, "per_token")], correct[(name, suite, "raw")], 2000, params["mcq"].seed).as_dict()
            result[suite]["single_token_options_share"] = sum(set(r["n_tokens"]) == {1} for r in sel) / len(sel)
        out["models"][name] = result
        log.info("%s: %s", name, {s: {n: round(result[s][n]["accuracy"], 3) for n in NORMALISATIONS}
                                  for s in ("mmlu", "pubmedqa", "all")})
    mean = {n: sum(out["models"][m]["all"][n]["accuracy"] for m in ("base", "finetuned")) / 2 for n in NORMALISATIONS}
    out["rule"] = "higher accuracy averaged over base and fine-tuned on the pooled non-test questions; tie keeps raw"
    out["mean_accuracy"] = mean
    out["chosen"] = "per_token" if mean["per_token"] > mean["raw"] else "raw"
    out["prompt_format"] = params["model.prompt_format"]
    write_json(args.out, {**out, **run_metadata()})
    log.info("chosen: %s (%s)", out["chosen"], mean)


if __name__ == "__main__":
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--datasets", required=True, help="folder with one folder per dataset (MEDQA_DATASETS_DIR)")
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--pubmedqa-max", type=int, default=None, help="subsample of PubMedQA's non-test half")
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
