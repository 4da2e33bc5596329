"""Stage report: reports/index.html, the evaluation as one self-contained page that opens from disk with no network.

Scores with CIs and the retrieval baseline, the plot stage's PNGs (inlined), per-question-type scores, answers side
by side, training, and provenance (params, checksums, commits, machines, versions, wall times). It quotes MedQuAD,
so it is a DVC-cached output like samples.md, not committed to git.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.evaluation.plots import read_per_qtype
from stages.lib.evaluation.report_page import breakdown_table, mcq_table, page_context, render_page
from stages.lib.io import atomic_file, read_json, read_jsonl, setup_logging, sha256_file
from stages.lib.versions import check_versions

log = logging.getLogger("stages.report")

# Every group: the page shows them all (provenance), so a changed value must redraw it.
PARAMS = ("data", "prepare", "split", "model", "tokenize", "lora", "quant", "train", "eval", "mcq", "task")
LIBRARIES = ("jinja2",)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_plots(folder: Path) -> dict[str, bytes]:
    plots = {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}
    if not plots:
        raise FileNotFoundError(f"no PNGs in {folder} (run `dvc repro plot` first)")
    return plots


def data_facts(download: dict, split: dict, adapter_base: dict, base_model: dict) -> dict:
    counts = split.get("counts", {})
    return {
        "MedQuAD source": f"{download.get('source')} ({download.get('source_origin')}, {download.get('format')})",
        "Files kept": f"{download.get('files_kept'):,} (checked against the committed manifest)",
        "Split": f"{', '.join(f'{k} {v:,}' for k, v in counts.items())}; grouped by {split.get('group_by')}, "
                 f"stratified by {', '.join(split.get('stratify_by', []))}, seed {split.get('seed')}",
        "Leaks between splits": ", ".join(f"{k} {v}" for k, v in split.get("leaks", {}).items()),
        # data.extra: each merged dataset with its pinned upstream and licence (WikiDoc's share-alike travels on)
        **{f"Added dataset {name}": f"{row.get('upstream')}; licence: {row.get('licence')}; split "
           + ", ".join(f"{k} {v:,}" for k, v in split.get("per_dataset", {}).get(name, {}).items())
           for name, row in download.get("extra", {}).items()},
        "Base model": f"{adapter_base.get('source')}",
        "Base weights sha256": base_model.get("weights_sha256"),
    }


def main(args: argparse.Namespace) -> None:
    check_versions(LIBRARIES, requirements=Path(args.requirements))
    params = load_params(args.params, PARAMS)
    split_dir, adapter = Path(args.split), Path(args.adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter} (run `dvc repro train` first)")
    split_files = sorted(split_dir.glob("*.jsonl"))
    if not split_files:
        raise FileNotFoundError(f"no split files in {split_dir} (run `dvc repro split` first)")
    train_run = read_json(args.train_run)
    reports = {"base_model": read_json(args.base_model), "train": train_run,
               "evaluate_base": read_json(args.eval_base), "evaluate_finetuned": read_json(args.eval_finetuned),
               "compare": read_json(args.details)}
    checksums = {f"{split_dir.name}/{p.name}": sha256_file(p) for p in split_files}
    checksums[f"{adapter.name}/{ADAPTER_WEIGHTS}"] = sha256_file(adapter / ADAPTER_WEIGHTS)
    checksums["data/eval/predictions.jsonl"] = sha256_file(args.predictions)
    breakdowns = [breakdown_table("By question type", "qtype", read_per_qtype(Path(args.per_qtype)),
                                  "Mean per-question scores of the questions of each MedQuAD question type.")]
    if args.mcq_metrics:
        breakdowns.append(mcq_table(read_json(args.mcq_metrics)))
    context = page_context(
        metrics=read_json(args.metrics), details=reports["compare"], breakdowns=breakdowns,
        preds=read_jsonl(args.predictions), plots=read_plots(Path(args.plots)), run=train_run, reports=reports,
        params=params, checksums=checksums,
        data=data_facts(read_json(args.download), read_json(args.split_report),
                        read_json(adapter / "base_model.json"), reports["base_model"]))
    page = render_page(Path(args.template).read_text(encoding="utf-8"), context)
    with atomic_file(args.out) as fh:
        fh.write(page)
    log.info("wrote %s (%.0f KB): %d plots, %d + %d answers side by side", args.out, len(page.encode()) / 1024,
             len(context["figures"]) + bool(context["loss_figure"]), len(context["stratified"]), len(context["worst"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml (shown on the page)")
    parser.add_argument("--requirements", required=True, help="the pins jinja2 is checked against")
    parser.add_argument("--template", required=True, help="the Jinja2 page template")
    parser.add_argument("--metrics", required=True, help="reports/metrics.json: the headline numbers")
    parser.add_argument("--details", required=True, help="reports/evaluation.json: every score and CI")
    parser.add_argument("--per-qtype", required=True, help="per-qtype CSV from compare")
    parser.add_argument("--predictions", required=True, help="side-by-side JSONL from compare")
    parser.add_argument("--plots", required=True, help="the plot stage's PNG folder")
    parser.add_argument("--train-run", required=True, help="reports/train/run.json")
    parser.add_argument("--download", required=True, help="reports/download.json")
    parser.add_argument("--split-report", required=True, help="reports/split.json")
    parser.add_argument("--base-model", required=True, help="reports/base_model.json")
    parser.add_argument("--eval-base", required=True, help="reports/eval/base.json")
    parser.add_argument("--eval-finetuned", required=True, help="reports/eval/finetuned.json")
    parser.add_argument("--mcq-metrics", default=None, help="reports/mcq/metrics.json (the multiple-choice table)")
    parser.add_argument("--split", required=True, help="the split folder (checksums)")
    parser.add_argument("--adapter", required=True, help="the adapter folder (checksum, base model)")
    parser.add_argument("--out", required=True, help="the page to write (DVC output; quotes MedQuAD)")
    return parser


if __name__ == "__main__":
    setup_logging()
    main(build_parser().parse_args())
