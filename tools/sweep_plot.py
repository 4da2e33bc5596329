"""Reference 001's sweep plot: final training loss vs learning rate, one line per batch size, from
`dvc exp show --json` (run by `make sweep-plot`; not a stage, since its input is the experiment list)."""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("sweep_plot")


def iter_runs(node):
    """Every experiment/commit entry holding params and metrics, wherever DVC nests it."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and "metrics" in data:
            yield node.get("name") or node.get("rev"), data
        for value in node.values():
            yield from iter_runs(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_runs(value)


def sweep_points(exp_json, params_file: str = "params.yaml",
                 metrics_file: str = "reports/train/metrics.json") -> dict[int, list[tuple[float, float]]]:
    """{batch size: sorted [(learning rate, final train loss)]} over runs that have all three values."""
    lines: dict[int, set] = defaultdict(set)
    for name, data in iter_runs(exp_json):
        train = (((data["params"] or {}).get(params_file) or {}).get("data") or {}).get("train") or {}
        metrics = ((data["metrics"] or {}).get(metrics_file) or {}).get("data") or {}
        if {"learning_rate", "per_device_batch_size"} <= set(train) and "train_loss" in metrics:
            point = (float(train["learning_rate"]), float(metrics["train_loss"]))
            lines[int(train["per_device_batch_size"])].add(point)
        else:
            log.info("skipping %s: no learning rate, batch size or train_loss", name)
    return {bs: sorted(points) for bs, points in sorted(lines.items())}


def plot(points: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise SystemExit("no experiment has train.learning_rate, train.per_device_batch_size and train_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    for bs, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {bs}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final training loss")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    log.info("wrote %s (%d batch sizes)", out, len(points))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    plot(sweep_points(json.loads(a.experiments.read_text())), a.out)
