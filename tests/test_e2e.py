"""`dvc repro` of the whole pipeline in a temporary git repo, on the fixture MedQuAD and the tiny model.

Then: a second `dvc repro` runs nothing, and changing one lora param reruns exactly the stages downstream of
train, never download/prepare/split/base_model/tokenize or the base evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.make_fixture_source import build_fixture_source
from tiny import write_tiny_base

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = {"download", "prepare", "split", "base_model", "tokenize", "train", "evaluate_base",
              "evaluate_finetuned", "compare", "plot"}


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("stages", "configs", "dvc.yaml", "params.yaml", "requirements.txt"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    source, _ = build_fixture_source(tmp / "src", "zip", manifest=repo / "stages/lib/medquad_manifest.json")
    tiny = write_tiny_base(tmp / "tiny_base")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source=str(tiny), gguf_file=None, sha256=None)
    params["tokenize"].update(max_length=512, max_train_samples=16, max_eval_samples=4)
    params["train"].update(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_batch_size=2)
    params["eval"].update(max_samples=4, max_new_tokens=8, batch_size=4, bootstrap_samples=200)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "MEDQUAD_SOURCE": str(source), "PATH": bindir + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, env)
    _run(git + ["add", "-A"], repo, env)
    _run(git + ["commit", "-qm", "fixture repo"], repo, env)
    return repo, env


def test_full_repro_then_noop_then_lora_change(repo):
    repo, env = repo
    dvc = [sys.executable, "-m", "dvc"]

    first = _run(dvc + ["repro"], repo, env)
    assert _ran(first) == ALL_STAGES

    for path in ("data/split/train.jsonl", "models/base/model.safetensors", "models/adapter/adapter_config.json",
                 "data/eval/base.jsonl", "data/eval/finetuned.jsonl", "data/eval/predictions.jsonl",
                 "reports/per_qtype.csv", "reports/report.md"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["n_test"] == 4
    for model in ("base", "finetuned"):
        for key in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity"):
            assert key in metrics[model], (model, key)
    assert 0.0 <= metrics["finetuned"]["rougeL"] <= 1.0
    low, high = metrics["delta"]["rougeL"]["ci95_low"], metrics["delta"]["rougeL"]["ci95_high"]
    assert low <= metrics["delta"]["rougeL"]["mean"] <= high
    train_metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert train_metrics  # written whole, not "{}"
    assert list((repo / "reports/plots").glob("*.png"))

    second = _run(dvc + ["repro"], repo, env)
    assert _ran(second) == set(), second

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lora"]["r"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(dvc + ["repro"], repo, env)
    assert _ran(third) == {"train", "evaluate_finetuned", "compare", "plot"}
    config = json.loads((repo / "models/adapter/adapter_config.json").read_text())
    assert config["r"] == 4
