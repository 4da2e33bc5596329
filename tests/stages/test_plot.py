"""Stage plot: PNGs, a numbers-only report.md, samples.md, dvclive layout and missing training logs."""

import pytest

from helpers import SECRET, write_plot_inputs as write_inputs

from stages.lib.evaluation.report import pick_samples
from stages.plot import PARAMS, build_parser, load_loss_curves, main


def test_plot_has_no_params():
    assert PARAMS == ()


def test_plot_writes_pngs_report_and_samples(tmp_path):
    main(build_parser().parse_args(write_inputs(tmp_path)))
    plots = sorted(p.name for p in (tmp_path / "reports" / "plots").iterdir())
    assert plots == ["lengths.png", "loss.png", "metrics.png", "per_qtype_rougeL.png"]
    assert all((tmp_path / "reports" / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)

    report = (tmp_path / "reports" / "report.md").read_text()
    assert "| ROUGE-L | 0.2030 | 0.3030 | +0.1000 | [+0.0457, +0.2110] | 0.4030 |" in report
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
