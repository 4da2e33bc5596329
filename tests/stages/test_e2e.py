"""The pipeline run the way the README tells a new user to run it, in a temporary git repo on the fixture MedQuAD
and the tiny model, with a PATH on which `python` is NOT the project's environment.

- `make repro` (no venv activated) runs every stage; a second `dvc repro` runs nothing; changing one lora param
  reruns exactly the stages downstream of train.
- Cached outputs are deterministic: after a new commit, a forced base_model leaves tokenize and everything below up
  to date, and a forced fresh retrain (checkpoints deleted) leaves the adapter's hash alone.
- With the venv activated: `dvc params diff`, a queued experiment run by `dvc queue start` (in DVC's copy of the repo
  under .dvc/tmp/exps, where a relative .venv path would not exist), `dvc exp show`, `dvc plots show`.
- A colleague's clone: `dvc push` to the project's default remote, `git clone` + `dvc pull`, then `dvc repro` runs
  no stage and `dvc metrics diff` shows no change.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fixtures.make_fixture_source import build_fixture_source
from fixtures.make_mcq_fixture import write_mcq_datasets
from helpers import ROOT

from stages.lib.testing.models import write_tiny_base

ALL_STAGES = {"download", "prepare", "split", "base_model", "tokenize", "train", "evaluate_base",
              "evaluate_finetuned", "compare", "plot", "report", "download_mcq", "prepare_mcq", "mcq_base",
              "mcq_finetuned", "mcq_compare"}
AFTER_TRAIN = {"train", "evaluate_finetuned", "compare", "plot", "report", "mcq_finetuned", "mcq_compare"}
MCQ_SUITES = ("medmcqa", "medqa", "pubmedqa", "mmlu")
VENV = Path(sys.prefix)  # the environment `make setup` built (CI) or the developer's own
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


def _not_up_to_date(status_output: str) -> set[str]:
    """Stage names `dvc status` lists as changed (it prints `<stage>:` for each)."""
    return set(re.findall(r"^(\w+):", status_output, flags=re.M))


def _commit(ws: Path, env: dict, message: str) -> None:
    _run(GIT + ["add", "-A"], ws, env)
    _run(GIT + ["commit", "-qm", message], ws, env)


def _after_first_run(repo) -> tuple[Path, dict]:
    """(repo, activated env) for the tests that build on the first test's committed run."""
    if not (repo["repo"] / "dvc.lock").is_file():
        pytest.skip("needs test_make_repro_then_noop_then_lora_change")
    return repo["repo"], repo["activated"]


def bare_path(tmp: Path) -> str:
    """A PATH like a fresh machine's: git, make and a `python` that has none of the project's packages (a venv
    made from the base interpreter, which sees no site-packages)."""
    bare = tmp / "bare-python"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(bare)],
                   check=True, capture_output=True)
    tools = sorted({str(Path(shutil.which(t)).parent) for t in ("git", "make", "sh")})
    return os.pathsep.join([str(bare / "bin"), *tools])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("stages", "configs", "dvc.yaml", "params.yaml", "requirements.txt", "requirements-ui.txt", "Makefile",
                 ".gitignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    source, _ = build_fixture_source(tmp / "src", "zip", manifest=repo / "stages/lib/data/medquad_manifest.json")
    datasets, _ = write_mcq_datasets(tmp / "datasets", manifest=repo / "stages/lib/data/datasets_manifest.json")
    tiny = write_tiny_base(tmp / "tiny_base")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source=str(tiny), gguf_file=None, sha256=None)
    params["tokenize"].update(max_length=512, max_train_samples=16, max_eval_samples=4)
    params["train"].update(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1, per_device_batch_size=2)
    params["eval"].update(max_samples=4, max_new_tokens=8, batch_size=4, bootstrap_samples=200)
    params["mcq"].update(max_samples={s: 4 for s in MCQ_SUITES}, bootstrap_samples=200)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # a clean environment: nothing of the developer's shell (venv, pyenv, PYTHONPATH) leaks in
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "SHELL", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
            "TRANSFORMERS_OFFLINE", "PYTHONHASHSEED")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(MEDQUAD_SOURCE=str(source), MEDQA_DATASETS_DIR=str(datasets))
    env.update(PATH=bare_path(tmp), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    probe = subprocess.run(["python", "-c", "import tqdm, yaml, torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, "the bare PATH's python imports the project's packages: the check would be void"

    _run(["git", "init", "-q"], repo, env)
    dvc = [str(VENV / "bin" / "dvc")]
    _run(dvc + ["init", "-q"], repo, env)
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the project's own default remote
    _run(GIT + ["add", "-A"], repo, env)
    _run(GIT + ["commit", "-qm", "fixture repo"], repo, env)
    # what `source .venv/bin/activate` gives the shell
    activated = {**env, "PATH": str(VENV / "bin") + os.pathsep + env["PATH"], "VIRTUAL_ENV": str(VENV)}
    return {"repo": repo, "tmp": tmp, "env": env, "activated": activated}


def make_repro(ws) -> str:
    """`make repro` exactly as the README says, with the set-up step taken as done (this venv is set up)."""
    stamp = VENV / ".installed"
    return _run(["make", f"VENV={VENV}", "-o", str(stamp), "-o", "setup", "repro"], ws["repo"], ws["env"])


def test_a_stage_run_by_the_wrong_python_says_how_to_fix_it(repo):
    out = _run(["python", "-m", "stages.download", "--help"], repo["repo"], repo["env"], check=False)
    assert "is not the project's Python" in out and "source .venv/bin/activate" in out and "Traceback" not in out


def test_make_repro_then_noop_then_lora_change(repo):
    ws, env = repo["repo"], repo["activated"]
    dvc = ["dvc"]
    first = make_repro(repo)
    assert _ran(first) == ALL_STAGES

    for path in ("data/split/train.jsonl", "models/base/model.safetensors", "models/adapter/adapter_config.json",
                 "data/eval/base.jsonl", "data/eval/finetuned.jsonl", "data/eval/predictions.jsonl",
                 "reports/per_qtype.csv", "reports/report.md", "reports/evaluation.json", "reports/train/run.json",
                 "reports/base_model.json", "reports/index.html"):
        assert (ws / path).is_file(), path
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    assert metrics["n_test"] == 4
    for model in ("base", "finetuned"):
        for key in ("bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "perplexity"):
            assert key in metrics[model], (model, key)
    assert 0.0 <= metrics["finetuned"]["rougeL"] <= 1.0
    gain = metrics["rougeL_gain"]
    assert gain["ci95_low"] <= gain["mean"] <= gain["ci95_high"]
    assert json.loads((ws / "reports/train/metrics.json").read_text())["eval_perplexity"] > 0
    assert list((ws / "reports/plots").glob("*.png"))

    second = _run(dvc + ["repro"], ws, env)
    assert _ran(second) == set(), second
    _commit(ws, env, "first run")

    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["lora"]["r"] = 4
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = _run(dvc + ["params", "diff"], ws, env)
    assert re.search(r"lora\.r\s+16\s+4", diff), diff
    third = _run(dvc + ["repro"], ws, env)
    assert _ran(third) == AFTER_TRAIN
    config = json.loads((ws / "models/adapter/adapter_config.json").read_text())
    assert config["r"] == 4
    _commit(ws, env, "lora.r=4")


def test_cached_outputs_are_deterministic(repo):
    ws, env = _after_first_run(repo)
    adapter_before = (ws / "models/adapter/adapter_model.safetensors").read_bytes()
    # a new commit changes the git commit every report records; the cached base must not notice
    (ws / "NOTES.md").write_text("a commit that changes no input\n")
    _commit(ws, env, "unrelated")
    assert _ran(_run(["dvc", "repro", "-f", "base_model"], ws, env)) == {"base_model"}
    # only the report page, which shows each stage run's commit and wall time, may want to redraw (seconds)
    assert _not_up_to_date(_run(["dvc", "status"], ws, env)) <= {"report"}

    # a genuine retrain from scratch (no checkpoint to reuse) with the same inputs gives the same adapter bytes
    shutil.rmtree(ws / "models/checkpoints")
    retrain = _run(["dvc", "repro", "-f", "-s", "train"], ws, env)
    assert _ran(retrain) == {"train"} and "fresh run" in retrain
    assert (ws / "models/adapter/adapter_model.safetensors").read_bytes() == adapter_before
    status = _run(["dvc", "status"], ws, env)
    # only plot and report, which read the run report's new timings, may want to run again; the evaluation does not
    assert _not_up_to_date(status) <= {"plot", "report"}, status
    _run(["dvc", "repro"], ws, env)
    _commit(ws, env, "retrained")


def test_queued_experiment_runs_in_dvcs_copy_and_exp_show_is_readable(repo):
    ws, env = _after_first_run(repo)
    _run(["dvc", "exp", "run", "--queue", "-S", "lora.r=2", "-n", "r2"], ws, env)
    _run(["dvc", "queue", "start", "-j", "1"], ws, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], ws, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert re.search(r"r2\s.*Success", status), status + _run(["dvc", "queue", "logs", "r2"], ws, env, check=False)

    shown = subprocess.run(["dvc", "exp", "show", "--csv"], cwd=ws, env=env, capture_output=True, text=True,
                           check=True).stdout
    table = list(csv.reader(io.StringIO(shown)))
    header = table[0]
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    deps = {d for s in stages.values() for d in s.get("deps", [])}
    groups = tuple(f"{g}." for g in yaml.safe_load((ws / "params.yaml").read_text()))
    metrics = [c for c in header if c not in deps and not c.startswith(groups) and
               c not in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")]
    # the numbers a user compares, nothing else: no versions, platforms, commits, paths, timings or per-file counts
    # the multiple-choice suites' numbers (reports/mcq/metrics.json) come on top: 8 a suite, PubMedQA's macro-F1s
    mcq = [c for c in metrics if any(suite in c for suite in MCQ_SUITES)]
    assert len(metrics) - len(mcq) <= 30 and len(mcq) <= 8 * len(MCQ_SUITES) + 2, metrics
    assert {"finetuned.rougeL", "finetuned.bleu", "finetuned.bertscore_f1", "finetuned.perplexity",
            "eval_perplexity"} <= set(metrics)
    assert not [c for c in metrics if re.search(r"librar|platform|commit|python|seconds|per_s|source|files", c)]
    row = next(r for r in table[1:] if "r2" in r[0])
    assert row[header.index("lora.r")] == "2" and float(row[header.index("finetuned.rougeL")]) >= 0

    plots = _run(["dvc", "plots", "show"], ws, env)
    assert (ws / "dvc_plots" / "index.html").is_file(), plots


def test_a_colleague_pulls_instead_of_recomputing(repo):
    (ws, env), tmp = _after_first_run(repo), repo["tmp"]
    _run(["dvc", "push"], ws, env)
    assert (tmp / "medquad-lora-remote").is_dir()  # the project's default remote: a folder beside the clone
    clone = tmp / "colleague"
    _run(["git", "clone", "-q", str(ws), str(clone)], tmp, env)
    _run(["dvc", "pull"], clone, env)
    assert (clone / "models/adapter/adapter_model.safetensors").is_file()
    assert list((clone / "reports/train/live/plots/metrics").rglob("*.tsv"))
    assert not (clone / "models/checkpoints").exists()
    assert _ran(_run(["dvc", "repro"], clone, env)) == set()
    assert _run(["dvc", "metrics", "diff"], clone, env).strip() == ""
    assert _not_up_to_date(_run(["dvc", "status"], clone, env)) == set()
