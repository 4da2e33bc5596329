"""The evaluation report as one self-contained HTML page (reports/index.html): what goes on it and how it is drawn.

Pure functions over what compare, train and the other stages wrote; the report stage reads the files and writes
the page. Every quoted text goes through Jinja2's autoescape, images are inlined as data URIs, and the page loads
nothing (no script, font or style from anywhere), so it opens from disk on a machine with no network.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

from stages.lib.evaluation.report import LABELS, SYSTEMS, TABLE_ROWS

# One line each, for a reader who has never seen these metrics. Keys are TABLE_ROWS' metric keys.
MEANINGS = {
    "bleu": "Word n-gram (1-4) overlap with the reference over all answers, cut for answers shorter than the "
            "references (corpus sacreBLEU / 100; 0-1, higher is better).",
    "rouge1": "Overlap of single words between answer and reference: F1 of precision and recall (0-1, higher is "
              "better).",
    "rouge2": "The same for pairs of consecutive words: rewards getting phrases right, not just words.",
    "rougeL": "Longest run of words the answer shares with the reference, in order, as F1 (0-1, higher is better): "
              "the headline score.",
    "rougeLsum": "ROUGE-L taken line by line, then pooled (the summarisation variant).",
    "bertscore_f1": "Similarity of meaning: each word's embedding matched to the closest in the other text (0-1, "
                    "higher is better; its level depends on the embedding model).",
    "rouge1_nostem": "ROUGE-1 without stemming ('treat' and 'treated' differ): Hugging Face evaluate's default, to "
                     "compare with other reports.",
    "rouge2_nostem": "ROUGE-2 without stemming.",
    "rougeL_nostem": "ROUGE-L without stemming.",
    "rougeLsum_nostem": "ROUGE-Lsum without stemming.",
    "brevity_penalty": "BLEU's penalty for short answers: 1 when the answers are, in total, at least as long as "
                       "the references.",
    "length_ratio": "Total words of the answers divided by total words of the references.",
    "perplexity": "How unsurprised the model is by the reference answers: exp of the mean negative "
                  "log-likelihood per answer token (lower is better; retrieval has none).",
    "loop_rate": "Share of answers that say one sentence, or one 8-word phrase, three times or more: a decoding "
                 "loop (lower is better; some human-written reference answers repeat list items too).",
}
# The training numbers worth a reader's time, in this order, each with its line.
TRAINING_ROWS = (
    ("train_loss", "Mean training loss (cross-entropy per answer token, nats) over the run."),
    ("eval_loss", "Loss on held-out validation answers after training."),
    ("base_eval_loss", "The same validation loss before training (the base model)."),
    ("eval_perplexity", "exp(eval_loss): validation perplexity after training (lower is better)."),
    ("base_eval_perplexity", "Validation perplexity of the base model."),
    ("perplexity_change", "Relative change of validation perplexity: fine-tuned / base - 1."),
    ("global_step", "Optimizer steps taken."),
    ("train_examples", "Training examples (question-answer pairs) used."),
    ("effective_batch_size", "Examples per optimizer step, over all devices."),
    ("trainable_params", "Parameters the LoRA adapter trains."),
    ("total_params", "Parameters of the whole model."),
    ("tokens_per_second", "Training speed, tokens per second."),
    ("peak_memory_mb", "Peak memory during training, MB."),
    ("train_seconds", "Training time, seconds."),
)
PLOT_CAPTIONS = {
    "metrics.png": "Left: each score for the three systems. Right: fine-tuned minus base and fine-tuned minus "
                   "retrieval, with 95% bootstrap intervals; a bar whose interval crosses 0 is no clear difference.",
    "per_qtype_rougeL.png": "ROUGE-L per question type (n = test questions of that type).",
    "lengths.png": "Answer lengths in words: all questions (left) and the quarter the fine-tuned model scores "
                   "worst on (right).",
    "loss.png": "Training loss per step and validation loss at each evaluation.",
}
TRAINING_PLOT = "loss.png"
BREAKDOWN_METRICS = (("rougeL", "ROUGE-L"), ("bertscore_f1", "BERTScore F1"))
WORST_CASES = 5
TEXT_CHARS = 1500  # per quoted text; MedQuAD has answers of 20,000 characters


@dataclasses.dataclass(frozen=True)
class Number:
    """A number on the page: `key` is its path in metrics.json (None where it is not a headline number)."""
    value: float | int | None
    text: str
    key: str | None = None


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def flatten(obj, prefix: str = "") -> dict:
    """{"finetuned.rougeL": 0.17, ...}: every leaf of a nested dict under its dotted path."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_headline(metrics: dict, details: dict) -> None:
    """metrics.json is the headline subset of evaluation.json, from one compare run; refuse a mixed pair."""
    pairs = {"rougeL_gain": ("delta", "rougeL")}
    for key, value in flatten(metrics).items():
        head, _, rest = key.partition(".")
        path = [*pairs[head], *rest.split(".")] if head in pairs else key.split(".")
        other = details
        for part in path:
            other = other.get(part) if isinstance(other, dict) else None
        if other != value:
            raise ValueError(f"metrics.json {key} = {value!r} but evaluation.json has {other!r}: the two come "
                             "from different compare runs (run `dvc repro compare`)")


def _ci(d: dict | None, key: str | None = None) -> dict | None:
    if not d:
        return None
    prefix = f"{key}." if key else None
    return {part: Number(d[part], f"{d[part]:+.4f}", prefix and prefix + part)
            for part in ("mean", "ci95_low", "ci95_high")}


def headline_rows(metrics: dict, details: dict) -> list[dict]:
    """TABLE_ROWS with the three systems, both paired differences and the meaning line; numbers that are in
    metrics.json carry their key there (the browser test reads them back)."""
    rows = []
    for key, label, ci_key in TABLE_ROWS:
        cells = {}
        for system in SYSTEMS:
            value = details[system].get(key)
            in_headline = key in metrics.get(system, {})
            cells[system] = Number(value, fmt(value), f"{system}.{key}" if in_headline else None)
        gain_key = "rougeL_gain" if ci_key == "rougeL" and "rougeL_gain" in metrics else None
        rows.append({
            "key": key, "label": label, "meaning": MEANINGS.get(key, ""), "cells": cells,
            "ci_of": ci_key if ci_key != key else None,
            "vs_base": _ci(details["delta"].get(ci_key), gain_key) if ci_key else None,
            "vs_retrieval": _ci(details["delta_vs_retrieval"].get(ci_key)) if ci_key else None,
        })
    return rows


def breakdown_table(title: str, column: str, rows: list[dict], meaning: str) -> dict:
    """One per-group table (question type today; dataset or suite once compare writes those CSVs)."""
    cols = [(f"{s}_{m}", f"{name}, {LABELS[s]}") for m, name in BREAKDOWN_METRICS for s in SYSTEMS
            if f"{s}_{m}" in rows[0]]
    body = [{"name": r[column], "n": int(r["n"]), "scores": [Number(float(r[c]), fmt(float(r[c]))) for c, _ in cols]}
            for r in rows]
    return {"title": title, "column": column.replace("_", " "), "meaning": meaning,
            "header": [label for _, label in cols], "rows": body}


MCQ_COLUMNS = (("base", "base"), ("finetuned", "fine-tuned"), ("delta", "fine-tuned − base"),
               ("delta_ci95_low", "its 95% CI, low"), ("delta_ci95_high", "its 95% CI, high"),
               ("chance", "chance"), ("majority", "majority baseline"))


def mcq_table(metrics: dict) -> dict:
    """The multiple-choice suites (reports/mcq/metrics.json) as one more per-group table: accuracy by option
    log-likelihood, base and fine-tuned on the same questions, with the paired difference and its CI."""
    rows = [{"name": suite, "n": int(m["n"]),
             "scores": [Number(m.get(k), fmt(m.get(k), 3)) for k, _ in MCQ_COLUMNS]}
            for suite, m in sorted(metrics.items())]
    return {"title": "Multiple-choice benchmarks", "column": "suite",
            "meaning": "Accuracy by option log-likelihood through the prompt format (zero-shot), base and fine-tuned "
                       "on the same questions; the CI is of the paired difference. The CPU default scores a "
                       "stratified subsample of each suite: a smoke check, not a benchmark figure.",
            "header": [label for _, label in MCQ_COLUMNS], "rows": rows}


def clip(text: str, limit: int = TEXT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " […]"


def _sample(p: dict, why: str) -> dict:
    return {"id": p["id"], "qtype": p.get("qtype"), "why": why, "question": clip(p["question"]),
            "reference": clip(p["reference"]),
            "answers": [{"system": LABELS[s], "text": clip(p[s]), "rougeL": Number(p[f"{s}_rougeL"],
                                                                                    fmt(p[f"{s}_rougeL"], 3))}
                        for s in ("base", "finetuned", "retrieval")]}


def pick_stratified(preds: list[dict], key: str = "qtype") -> list[dict]:
    """One question per type: the one with the median fine-tuned ROUGE-L in it (a typical answer, not a lucky one)."""
    groups: dict[str, list[dict]] = {}
    for p in preds:
        groups.setdefault(str(p.get(key)), []).append(p)
    picks = []
    for name in sorted(groups):
        ranked = sorted(groups[name], key=lambda p: (p["finetuned_rougeL"], str(p["id"])))
        picks.append(ranked[(len(ranked) - 1) // 2])
    return picks


def pick_worst(preds: list[dict], k: int = WORST_CASES) -> list[dict]:
    """The k questions with the lowest fine-tuned ROUGE-L."""
    return sorted(preds, key=lambda p: (p["finetuned_rougeL"], str(p["id"])))[:k]


def data_uri(png: bytes) -> str:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_figures(plots: dict[str, bytes]) -> list[dict]:
    """{name: PNG bytes} -> figures with inlined images and captions: the known plots in PLOT_CAPTIONS' order,
    then any other by name."""
    order = {name: k for k, name in enumerate(PLOT_CAPTIONS)}
    return [{"name": name, "caption": PLOT_CAPTIONS.get(name, Path(name).stem.replace("_", " ")),
             "src": data_uri(plots[name])} for name in sorted(plots, key=lambda n: (order.get(n, len(order)), n))]


def training_rows(run: dict) -> list[dict]:
    return [{"key": key, "meaning": meaning, "value": Number(run[key], fmt(run[key]))}
            for key, meaning in TRAINING_ROWS if run.get(key) is not None]


def params_rows(params: dict) -> list[dict]:
    """{group: dataclass} -> one row per key, `group.key = value`."""
    rows = []
    for group, values in params.items():
        for key, value in (dataclasses.asdict(values) if dataclasses.is_dataclass(values) else
                           {"": values}).items():
            rows.append({"key": f"{group}.{key}" if key else group, "value": value})
    return rows


def _run_of(report: dict) -> dict:
    """The commit/platform/libraries block of a stage report (top level, or under `metadata` or `run`)."""
    return report.get("metadata") or report.get("run") or report


def _seconds(*parts: tuple[str, float | None]) -> str:
    shown = [f"{name} {value:,.1f} s" for name, value in parts if value is not None]
    return ", ".join(shown) or "not recorded"


def _precision(p: dict | None) -> str:
    return f"{p['device']} {p['dtype']}, quantization {p['quant']}" if p else "—"


def runs_rows(reports: dict[str, dict]) -> list[dict]:
    """One row per stage run: its commit, machine, precision and wall times (from the reports each stage wrote)."""
    rows = []
    for stage, report in reports.items():
        meta = _run_of(report)
        if stage == "train":
            hw = report.get("hardware") or {}
            where = f"{hw.get('cpu_count')} CPU cores, {hw.get('torch_threads')} torch threads"
            where += f", CUDA: {hw['cuda']}" if hw.get("cuda") else ", no GPU"
            times = _seconds(("training", report.get("train_seconds")), ("validation", report.get("eval_seconds")))
            if report.get("reused_completed_run"):
                times += " (the last run reused a finished checkpoint; times are of the run that trained it)"
            precision = _precision(report.get("precision"))
        elif stage.startswith("evaluate"):
            where, precision = "", _precision(report.get("precision"))
            times = _seconds(("generation", report.get("generation_seconds")),
                             ("scoring", report.get("scoring_seconds")))
        else:
            where, precision, times = "", "—", _seconds(("stage", report.get("seconds")))
        rows.append({"stage": stage, "commit": meta.get("git_commit") or "—", "platform": meta.get("platform", "—"),
                     "python": meta.get("python", "—"), "where": where, "precision": precision, "times": times})
    return rows


def versions_table(reports: dict[str, dict]) -> dict:
    """Library versions as each stage run recorded them: one row per library, one column per stage."""
    stages = [s for s, r in reports.items() if _run_of(r).get("libraries")]
    names = sorted({n for s in stages for n in _run_of(reports[s])["libraries"]})
    return {"stages": stages,
            "rows": [{"name": n, "versions": [_run_of(reports[s])["libraries"].get(n) or "—" for s in stages]}
                     for n in names]}


def page_context(*, metrics: dict, details: dict, breakdowns: list[dict], preds: list[dict],
                 plots: dict[str, bytes], run: dict | None, reports: dict[str, dict], params: dict,
                 data: dict, checksums: dict[str, str]) -> dict:
    """Everything the template shows. `reports` are the stage reports by stage name (provenance), `data` the
    download/split facts, `checksums` sha256 by file."""
    check_headline(metrics, details)
    if not preds:
        raise ValueError("no predictions to quote")
    figures = plot_figures(plots)
    return {
        "split": Number(metrics["split"], metrics["split"], "split") if "split" in metrics else None,
        "n_test": Number(metrics["n_test"], fmt(metrics["n_test"]), "n_test"),
        "n_split": details.get("n_test_split"),
        "bootstrap": details.get("bootstrap", {}),
        "bertscore": details.get("bertscore", {}),
        "perplexity_reduction": details.get("perplexity_reduction"),
        "headline": headline_rows(metrics, details),
        "systems": [LABELS[s] for s in SYSTEMS],
        "figures": [f for f in figures if f["name"] != TRAINING_PLOT],
        "loss_figure": next((f for f in figures if f["name"] == TRAINING_PLOT), None),
        "breakdowns": breakdowns,
        "stratified": [_sample(p, f"median fine-tuned ROUGE-L of its type ({p.get('qtype')})")
                       for p in pick_stratified(preds)],
        "worst": [_sample(p, "among the lowest fine-tuned ROUGE-L") for p in pick_worst(preds)],
        "text_chars": TEXT_CHARS,
        "training": training_rows(run) if run else [],
        "params": params_rows(params),
        "data": data,
        "checksums": checksums,
        "runs": runs_rows(reports),
        "versions": versions_table(reports),
    }


def render_page(template: str, context: dict) -> str:
    """Fill the Jinja2 template with autoescape on: every quoted text is HTML-escaped."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(template).render(**context)
