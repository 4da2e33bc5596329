"""Stage plot: PNGs under reports/plots/, reports/report.md (numbers only) and reports/samples.md (answers).

Reads compare's outputs and the training logs. report.md is committed, so it holds metric tables and qtype names
but no MedQuAD text; the side-by-side sample answers go to samples.md, a DVC-cached output.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from stages.lib.evaluation.plots import (load_loss_curves, plot_lengths, plot_loss, plot_metric_bars, plot_per_qtype,
                                         read_per_qtype)
from stages.lib.evaluation.report import pick_samples, report_markdown, samples_markdown
from stages.lib.io import atomic_dir, atomic_file, read_json, read_jsonl, setup_logging
from stages.lib.versions import check_versions

log = logging.getLogger("stages.plot")

PARAMS = ()
LIBRARIES = ("matplotlib", "numpy")


def main(args: argparse.Namespace) -> None:
    check_versions(LIBRARIES)
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines

    metrics = read_json(args.metrics)
    qtype_rows = read_per_qtype(Path(args.per_qtype))
    preds = read_jsonl(args.predictions)
    if not preds:
        raise ValueError(f"{args.predictions} is empty")
    train_metrics = read_json(args.train_metrics) if Path(args.train_metrics).is_file() else None
    if train_metrics is None:
        log.warning("no training metrics at %s; the report has no training section", args.train_metrics)
    curves = load_loss_curves(Path(args.train_live)) if Path(args.train_live).is_dir() else {}
    if not curves:
        log.warning("no dvclive loss TSVs under %s (train.report_to: none?); skipping the loss plot", args.train_live)

    out = Path(args.out)
    report_dir = Path(args.report).parent
    plots = []
    with atomic_dir(out) as tmp:
        if curves:
            plot_loss(curves, tmp / "loss.png")
            plots.append("loss.png")
        plot_metric_bars(metrics, tmp / "metrics.png")
        plot_per_qtype(qtype_rows, tmp / "per_qtype_rougeL.png")
        plot_lengths(preds, tmp / "lengths.png")
        plots += ["metrics.png", "per_qtype_rougeL.png", "lengths.png"]
    rel = [Path(os.path.relpath(out / p, report_dir)).as_posix() for p in plots]
    samples_link = Path(os.path.relpath(args.samples, report_dir)).as_posix()
    with atomic_file(args.samples) as fh:
        fh.write(samples_markdown(pick_samples(preds)))
    with atomic_file(args.report) as fh:
        fh.write(report_markdown(metrics, qtype_rows, train_metrics, rel, samples_link))
    log.info("wrote %d plots to %s, %s and %s", len(plots), out, args.report, args.samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", required=True, help="reports/metrics.json from compare")
    parser.add_argument("--per-qtype", required=True, help="per-qtype CSV from compare")
    parser.add_argument("--predictions", required=True, help="side-by-side JSONL from compare")
    parser.add_argument("--train-live", required=True, help="dvclive metrics folder (…/plots/metrics)")
    parser.add_argument("--train-metrics", required=True, help="training metrics JSON")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--report", required=True, help="markdown report (committed; numbers only)")
    parser.add_argument("--samples", required=True, help="markdown sample answers (DVC output; MedQuAD text)")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
