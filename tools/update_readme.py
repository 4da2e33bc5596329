"""Regenerate the README's results block from the committed metrics files, so no number in it is typed by hand.

    python -m tools.update_readme   (or `make readme`)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from stages.lib.evaluation.report import comparison_table  # the same table report.md shows

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
log = logging.getLogger("update_readme")


def results_block(metrics: dict, train: dict, tokenize: dict) -> str:
    red = metrics["perplexity_reduction"]
    tr = tokenize["splits"]["train"]
    lines = [
        BEGIN,
        f"Default CPU profile, generated from `reports/evaluation.json` and `reports/train/run.json` "
        f"(git commit `{(metrics.get('git_commit') or 'n/a')[:10]}`).",
        "",
        f"- Training: {train['train_examples']} stratified train examples (≤ {tokenize['max_length']} tokens, "
        f"{tr['truncated']} cut), {train['global_step']} steps of {train['effective_batch_size']}, "
        f"{train['trainable_params']:,} trainable parameters ({train['trainable_percent']:.2f}%), "
        f"{train['tokens_per_second']} tokens/s, {train['train_seconds']:.0f} s.",
        f"- Validation perplexity on answer tokens: base {train['base_eval_perplexity']:.2f} → fine-tuned "
        f"{train['eval_perplexity']:.2f} ({100 * train['perplexity_change']:+.1f}%).",
        f"- Test subset: {metrics['n_test']} questions (stratified by qtype, fixed seed). Reference-answer perplexity "
        f"{metrics['base']['perplexity']:.2f} → {metrics['finetuned']['perplexity']:.2f} "
        f"({100 * red['value']:.1f}% lower, 95% CI [{100 * red['ci95_low']:.1f}%, {100 * red['ci95_high']:.1f}%]).",
        "",
        *comparison_table(metrics),
        END,
    ]
    return "\n".join(lines)


def main(args) -> None:
    logging.basicConfig(level=logging.INFO)
    metrics = json.loads(Path(args.metrics).read_text())
    train = json.loads(Path(args.train_metrics).read_text())
    tokenize = json.loads(Path(args.tokenize).read_text())
    readme = Path(args.readme).read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{args.readme} lacks the {BEGIN} / {END} markers")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: results_block(metrics, train, tokenize),
                 readme, flags=re.S)
    Path(args.readme).write_text(new)
    log.info("updated %s", args.readme)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", default="reports/evaluation.json")
    p.add_argument("--train-metrics", default="reports/train/run.json")
    p.add_argument("--tokenize", default="reports/tokenize.json")
    p.add_argument("--readme", default="README.md")
    main(p.parse_args())
