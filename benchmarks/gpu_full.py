"""Issue 7 driver: the project's own stages on the full MedQuAD split on one GPU, without dvc.

Steps (each idempotent, state under --work so a later call on the same warm machine continues):
  prepare  merge params.yaml + profiles/gpu-full.yaml, point model.source at the GGUF
  train    base_model -> tokenize -> train (the stage scripts, as dvc.yaml runs them)
  sweep    decoding candidates on a stratified VALIDATION subset, fine-tuned model only; pick by ROUGE-L
  test     base and fine-tuned on the full test split with the chosen decoding (scored later on the CPU machine)
Results worth keeping are copied to --out (the adapter in bf16 so it fits the 16 MiB return limit).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_full")

# Candidates differ only in answer budget and loop control; all greedy. Chosen on validation, never test.
CANDIDATES = [
    {"max_new_tokens": 256, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    {"max_new_tokens": 256, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3},
    {"max_new_tokens": 256, "repetition_penalty": 1.0, "no_repeat_ngram_size": 4},
    {"max_new_tokens": 384, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3},
    {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 0},
    {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3},
]
SWEEP_QUESTIONS = 256


def run_stage(module: str, *args: str) -> None:
    cmd = [sys.executable, "-m", f"stages.{module}", *args]
    log.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    log.info("%s took %.1f s", module, time.perf_counter() - start)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = deep_merge(base[key], value) if both_dicts else value
    return out


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def step_prepare(a) -> dict:
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        yaml.safe_load((ROOT / a.profile).read_text()))
    params["model"].update(source=str(a.gguf), gguf_file=None, sha256=a.gguf_sha256)
    write_params(a.work / "params.yaml", params)
    return params


def step_train(a) -> None:
    p = str(a.work / "params.yaml")
    w = a.work
    if not (w / "models/base/config.json").is_file():
        run_stage("base_model", "--params", p, "--out", str(w / "models/base"), "--report", str(w / "base_model.json"))
    if not (w / "data/tokenized/train").is_dir():
        run_stage("tokenize", "--params", p, "--split", str(a.split), "--base", str(w / "models/base"),
                  "--out", str(w / "data/tokenized"), "--report", str(w / "tokenize.json"))
    run_stage("train", "--params", p, "--tokenized", str(w / "data/tokenized"), "--base", str(w / "models/base"),
              "--checkpoints", str(w / "checkpoints"), "--live", str(w / "live"), "--out", str(w / "models/adapter"),
              "--metrics", str(w / "train_headline.json"), "--run-report", str(w / "train_metrics.json"))
    export_adapter(w / "models/adapter", a.out)
    history = latest_log_history(w / "checkpoints")
    shutil.copy2(w / "train_metrics.json", a.out / "train_metrics.json")
    (a.out / "train_history.json").write_text(json.dumps({"log_history": history,
                                                          "tokenize": json.loads((w / "tokenize.json").read_text())}))


def latest_log_history(checkpoints: Path) -> list:
    states = sorted(checkpoints.glob("*/checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(states[-1].read_text())["log_history"] if states else []


def export_adapter(adapter: Path, out: Path) -> None:
    """bf16 copy of the adapter weights (r=16 on all linear layers is ~20 MB in fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16).contiguous()
               for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors")
    shutil.copy2(adapter / "adapter_config.json", out / "adapter_config.json")
    shutil.copy2(adapter / "training.json", out / "adapter_training.json")


def rouge_l(preds: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)


def step_sweep(a, params: dict) -> dict:
    from stages.lib.io import read_jsonl, write_jsonl
    from stages.lib.data.sampling import stratified_sample

    val_dir = a.work / "valsplit"
    val_dir.mkdir(exist_ok=True)
    validation = stratified_sample(read_jsonl(a.split / "validation.jsonl"), SWEEP_QUESTIONS, "qtype", 1234)
    write_jsonl(val_dir / "test.jsonl", validation)  # evaluate reads <split>/test.jsonl; this is validation
    refs = {r["id"]: r["answer"] for r in validation}
    results = []
    for i, cand in enumerate(CANDIDATES):
        cparams = deep_merge(params, {"eval": {**cand, "max_samples": None}})
        pfile = write_params(a.work / f"params_sweep{i}.yaml", cparams)
        out = a.work / f"sweep{i}.jsonl"
        run_stage("evaluate", "--params", str(pfile), "--split", str(val_dir), "--base", str(a.work / "models/base"),
                  "--adapter", str(a.work / "models/adapter"), "--out", str(out), "--summary", str(out) + ".json")
        rows = read_jsonl(out)
        score = rouge_l([r["prediction"] for r in rows], [refs[r["id"]] for r in rows])
        summary = json.loads(Path(str(out) + ".json").read_text())
        results.append({**cand, "val_rougeL": round(score, 4), "eos_rate": summary["eos_rate"],
                        "mean_new_tokens": summary["mean_new_tokens"], "seconds": summary["generation_seconds"]})
        log.info("candidate %s: validation ROUGE-L %.4f", cand, score)
    best = max(results, key=lambda r: r["val_rougeL"])
    chosen = {k: best[k] for k in CANDIDATES[0]}
    (a.out / "sweep.json").write_text(json.dumps({"questions": len(validation), "split": "validation",
                                                  "results": results, "chosen": chosen}, indent=1))
    (a.work / "chosen.json").write_text(json.dumps(chosen))
    return chosen


def step_test(a, params: dict) -> None:
    chosen = json.loads((a.work / "chosen.json").read_text())
    pfile = write_params(a.work / "params_test.yaml", deep_merge(params, {"eval": chosen}))
    shutil.copy2(pfile, a.out / "params_used.yaml")
    for name, adapter in (("finetuned", ["--adapter", str(a.work / "models/adapter")]), ("base", [])):
        out = a.out / f"{name}.jsonl"
        run_stage("evaluate", "--params", str(pfile), "--split", str(a.split), "--base", str(a.work / "models/base"),
                  *adapter, "--out", str(out), "--summary", str(a.out / f"{name}_summary.json"))


def main(a) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    params = step_prepare(a)
    for step in a.steps.split(","):
        start = time.perf_counter()
        {"train": lambda: step_train(a), "sweep": lambda: step_sweep(a, params),
         "test": lambda: step_test(a, params)}[step]()
        log.info("step %s done in %.1f s", step, time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--gguf-sha256", default="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    parser.add_argument("--split", type=Path, required=True, help="folder with train/validation/test.jsonl")
    parser.add_argument("--profile", default="profiles/gpu-full.yaml")
    parser.add_argument("--work", type=Path, required=True, help="state folder (outside the checkout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="train,sweep,test")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
