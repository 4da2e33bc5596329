"""Accuracy of the multiple-choice suites with what is needed to read it: bootstrap CIs, the paired fine-tuned - base
difference, chance, the majority baseline and (PubMedQA) macro-F1. Pure functions over the scored rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from stages.lib.evaluation.bootstrap import paired_bootstrap_ci

SYSTEMS = ("base", "finetuned")
NORMALISATIONS = ("raw", "per_token")  # summed option log-prob | its mean per token (config.MCQ_NORMALISATIONS)
MACRO_F1_SUITES = ("pubmedqa",)  # class-imbalanced yes/no/maybe: accuracy alone flatters "always yes"


def predict(row: dict, normalisation: str) -> int:
    """The chosen option of a scored row (ties: the first)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    values = [lp if normalisation == "raw" else lp / n for lp, n in zip(row["logprob"], row["n_tokens"])]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def align_rows(base: list[dict], finetuned: list[dict]) -> list[dict]:
    """The fine-tuned rows in the base rows' order, after checking both scored the same questions and options."""
    by_id = {r["id"]: r for r in finetuned}
    if len(by_id) != len(finetuned) or sorted(by_id) != sorted(r["id"] for r in base):
        raise ValueError("the base and fine-tuned mcq scores are not of the same questions (rerun both stages)")
    out = []
    for row in base:
        other = by_id[row["id"]]
        if other["answer_index"] != row["answer_index"] or len(other["logprob"]) != len(row["logprob"]):
            raise ValueError(f"{row['id']}: the base and fine-tuned rows disagree on the answer or the options")
        out.append(other)
    return out


def macro_f1(predicted, gold, n_classes: int) -> float:
    """Mean F1 over the classes (a class never predicted nor gold counts 0, as scikit-learn's zero_division=0)."""
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    scores = []
    for c in range(n_classes):
        tp = np.sum((predicted == c) & (gold == c))
        denom = np.sum(predicted == c) + np.sum(gold == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def accuracy_ci(correct, n_resamples: int, seed: int) -> dict:
    # the CI of mean(correct - 0): the bootstrap of one system's accuracy, through the same resampler
    correct = np.asarray(correct, dtype=float)
    return paired_bootstrap_ci(correct, np.zeros_like(correct), n_resamples, seed).as_dict("accuracy")


def suite_metrics(base: list[dict], finetuned: list[dict], n_resamples: int, seed: int) -> dict:
    """Everything about one suite's rows (aligned, same order), under both normalisations."""
    gold = np.array([r["answer_index"] for r in base])
    n_options = [len(r["logprob"]) for r in base]
    counts = np.bincount(gold, minlength=max(n_options))
    majority = int(np.argmax(counts))  # ties: the lowest position
    out = {"n": len(base), "chance": float(np.mean([1 / k for k in n_options])),
           "majority": {"option_index": majority, "accuracy": float(np.mean(gold == majority))}}
    for norm in NORMALISATIONS:
        preds = {s: np.array([predict(r, norm) for r in rows]) for s, rows in zip(SYSTEMS, (base, finetuned))}
        correct = {s: (preds[s] == gold).astype(float) for s in SYSTEMS}
        block = {s: accuracy_ci(correct[s], n_resamples, seed) for s in SYSTEMS}
        block["delta"] = paired_bootstrap_ci(correct["finetuned"], correct["base"], n_resamples, seed).as_dict()
        if base[0]["suite"] in MACRO_F1_SUITES:
            k = max(n_options)
            for s in SYSTEMS:
                block[s]["macro_f1"] = macro_f1(preds[s], gold, k)
            out["majority"]["macro_f1"] = macro_f1(np.full_like(gold, majority), gold, k)
        block["predicted_share"] = {s: np.bincount(preds[s], minlength=max(n_options)).tolist() for s in SYSTEMS}
        out[norm] = block
    return out


def by_suite(rows: list[dict]) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r["suite"]].append(i)
    return dict(groups)


def all_metrics(base: list[dict], finetuned: list[dict], n_resamples: int, seed: int) -> dict[str, dict]:
    finetuned = align_rows(base, finetuned)
    return {suite: suite_metrics([base[i] for i in idx], [finetuned[i] for i in idx], n_resamples, seed)
            for suite, idx in by_suite(base).items()}


def headline(metrics: dict[str, dict], normalisation: str) -> dict:
    """reports/mcq/metrics.json: per suite, numbers only, under the headline normalisation."""
    out = {}
    for suite, m in metrics.items():
        block = m[normalisation]
        row = {"n": m["n"], "base": block["base"]["accuracy"], "finetuned": block["finetuned"]["accuracy"],
               "delta": block["delta"]["mean"], "delta_ci95_low": block["delta"]["ci95_low"],
               "delta_ci95_high": block["delta"]["ci95_high"], "chance": m["chance"],
               "majority": m["majority"]["accuracy"]}
        if "macro_f1" in block["base"]:
            row |= {"base_macro_f1": block["base"]["macro_f1"], "finetuned_macro_f1": block["finetuned"]["macro_f1"]}
        out[suite] = row
    return out


def per_subject_rows(base: list[dict], finetuned: list[dict], normalisation: str) -> list[dict]:
    """One CSV row per (suite, subject): n and both accuracies under the headline normalisation."""
    finetuned = align_rows(base, finetuned)
    groups = defaultdict(list)
    for b, f in zip(base, finetuned):
        groups[(b["suite"], b["subject"])].append((b, f))
    rows = []
    for (suite, subject), pairs in sorted(groups.items()):
        acc = {s: float(np.mean([predict(p[k], normalisation) == p[k]["answer_index"] for p in pairs]))
               for k, s in enumerate(SYSTEMS)}
        rows.append({"suite": suite, "subject": subject, "n": len(pairs), "base_accuracy": round(acc["base"], 6),
                     "finetuned_accuracy": round(acc["finetuned"], 6),
                     "delta": round(acc["finetuned"] - acc["base"], 6)})
    return rows
