"""The plot stage's inputs (dvclive loss TSVs, the per-qtype CSV) and its matplotlib figures: loss curves, metric
bars with bootstrap CIs, ROUGE-L per question type, answer lengths."""

from __future__ import annotations

import csv
from pathlib import Path

from stages.lib.evaluation.report import LABELS, SYSTEMS

COLORS = {"base": "#8c8c8c", "finetuned": "#1f77b4", "retrieval": "#ff7f0e"}
BAR_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1")


# ---------- inputs ----------

def read_tsv(path: Path) -> list[tuple[float, float]]:
    """(step, value) rows of a dvclive metric TSV (columns: [timestamp,] step, <name>)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    name = path.stem
    return [(float(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]


def load_loss_curves(metrics_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Train and eval loss curves from dvclive's metrics folder; missing files give missing keys.

    The train stage logs per-step loss to train/loss.tsv and eval loss to eval/loss.tsv at the global step. Stock
    dvclive callbacks put the per-step loss in loss.tsv and only the end-of-training mean in train/loss.tsv, so
    the longer of the two train files is the curve.
    """
    curves = {}
    train = [read_tsv(p) for p in (metrics_dir / "train" / "loss.tsv", metrics_dir / "loss.tsv") if p.is_file()]
    if train:
        curves["train"] = max(train, key=len)
    if (metrics_dir / "eval" / "loss.tsv").is_file():
        curves["eval"] = read_tsv(metrics_dir / "eval" / "loss.tsv")
    return {k: v for k, v in curves.items() if v}


def read_per_qtype(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


# ---------- plots ----------

def plot_loss(curves: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        if split in curves:
            steps, values = zip(*curves[split])
            ax.plot(steps, values, style, label=f"{split} loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats / answer token)")
    ax.set_title("Training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_bars(metrics: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(BAR_METRICS))
    width = 0.27
    for k, system in enumerate(SYSTEMS):
        values = [metrics[system].get(m, np.nan) for m in BAR_METRICS]
        left.bar(x + (k - 1) * width, values, width, label=LABELS[system], color=COLORS[system])
    left.set_xticks(x, BAR_METRICS, rotation=20)
    left.set_ylim(0, 1)
    left.set_ylabel("score (0-1)")
    left.set_title(f"Scores on {metrics['n_test']} test questions")
    left.legend()

    ci_metrics = [m if m != "bleu" else "sentence_bleu" for m in BAR_METRICS]
    for k, (key, label, color) in enumerate((("delta", "fine-tuned - base", COLORS["base"]),
                                             ("delta_vs_retrieval", "fine-tuned - retrieval", COLORS["retrieval"]))):
        deltas = [metrics[key].get(m) for m in ci_metrics]
        means = [d["mean"] if d else np.nan for d in deltas]
        err = np.array([[d["mean"] - d["ci95_low"], d["ci95_high"] - d["mean"]] if d else [0, 0] for d in deltas]).T
        right.bar(x + (k - 0.5) * 0.4, means, 0.4, yerr=err, capsize=3, label=label, color=color)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(x, ci_metrics, rotation=20)
    right.set_ylabel("difference of means")
    right.set_title("Paired differences with bootstrap 95% CIs")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_qtype(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted(rows, key=lambda r: float(r["finetuned_rougeL"]))
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(rows)))
    for k, system in enumerate(SYSTEMS):
        column = f"{system}_rougeL"
        if column in rows[0]:
            ax.barh(y + (k - 1) * 0.27, [float(r[column]) for r in rows], 0.27, label=LABELS[system],
                    color=COLORS[system])
    ax.set_yticks(y, [f"{r['qtype']} (n={r['n']})" for r in rows])
    ax.set_xlabel("ROUGE-L F1")
    ax.set_title("ROUGE-L per question type")
    # Below the axes: inside, it hides the bars of whichever qtype sits in its corner.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.45 * len(rows))), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def bottom_quartile(preds: list[dict], system: str = "finetuned") -> list[dict]:
    """The quarter of questions with the lowest ROUGE-L for `system` (at least one)."""
    ranked = sorted(preds, key=lambda p: (p[f"{system}_rougeL"], p["id"]))
    return ranked[: max(1, len(ranked) // 4)]


def plot_lengths(preds: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    poor = bottom_quartile(preds)
    # MedQuAD has a few answers of thousands of words; clip the top 2% into the last bin so the bulk stays visible.
    top = float(np.percentile([len(p[f].split()) for p in preds for f in ("reference", *SYSTEMS)], 98)) + 1

    def words(rows, field):
        return np.minimum([len(r[field].split()) for r in rows], top)

    bins = np.linspace(0, top, 31)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.hist(words(preds, "reference"), bins=bins, color="black", alpha=0.25, label="reference")
    for system in SYSTEMS:
        left.hist(words(preds, system), bins=bins, histtype="step", linewidth=1.5, color=COLORS[system],
                  label=LABELS[system])
    left.set_title("Answer length, all questions")
    right.hist(words(poor, "reference"), bins=bins, color="black", alpha=0.25, label="reference")
    right.hist(words(poor, "finetuned"), bins=bins, histtype="step", linewidth=1.5, color=COLORS["finetuned"],
               label="fine-tuned")
    right.set_title(f"Bottom-quartile fine-tuned ROUGE-L ({len(poor)} questions)")
    for ax in (left, right):
        ax.set_xlabel(f"words (last bin: {top:.0f} or more)")
        ax.set_ylabel("questions")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
