"""The train stage itself, timed on a random-init model of a real shape: one or several processes (issue 8).

Unlike bench_gpu.py (which times recipes in its own loop), this runs `python -m stages.train` exactly as
`dvc repro` does (through the launcher when train.distributed is ddp/fsdp), on synthetic data with the real MedQuAD
token lengths (benchmarks/lengths.json), and reads what the stage reports: steady-state tokens/s (after
training.callbacks.WARMUP_STEPS steps; all processes together), peak memory per process, and the loss per step.
The memory used on every GPU is sampled beside it (stages/lib/testing/memory.py: NVML, else nvidia-smi).

    python3 -m benchmarks.bench_stage --shape llama3-8b --runs fsdp:1 fsdp:2 --work /root/bench --out $OUT
    python3 -m benchmarks.bench_stage --shape smollm2-135m --runs none:1 ddp:2 --work /root/bench --out $OUT
    python -m benchmarks.bench_stage --shape tiny --runs none:1 ddp:2 --work /tmp/bench --out /tmp/bench  # CPU

Every run has the same effective batch (per-device batch x processes x accumulation), so the loss curves of the
runs are comparable step for step; the 1-process run accumulates over as many micro-batches as the widest run has
processes. Scaling efficiency = tokens/s with N processes / (N x tokens/s with 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_gpu import (LORA_TARGETS, MAX_LENGTH, SHAPES, card_slug, device_info, load_lengths,
                                  make_train_examples, pick_examples, versions)
from stages.lib.testing.memory import GpuMemorySampler

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_stage")


def write_base(folder: Path, shape: str, seed: int) -> None:
    """Random-init model of the shape (bf16 safetensors) + a small tokenizer with pad != eos, as models/base."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from stages.lib.testing.models import random_llama

    marker = folder / "source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        log.info("reusing %s", folder)
        return
    cfg = dict(SHAPES[shape])
    config = LlamaConfig(**cfg, dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(config, seed, device, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # else this process holds ~32 GiB of GPU 0 (8B) in every NVML sample of the runs
    # ids of the synthetic data are random; the stage only needs pad/eos from the tokenizer
    vocab = {"<pad>": cfg["pad_token_id"], "<eos>": cfg["eos_token_id"], "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(folder)
    marker.write_text(json.dumps({"source": f"random-init {shape} (seed {seed})", "shape": shape,
                                  "weights_sha256": f"random-init-{shape}-{seed}"}))


def write_tokenized(folder: Path, shape: str, n_train: int, n_eval: int, seed: int) -> dict:
    """data/tokenized-shaped datasets: real (prompt, answer) lengths, random ids, completion-only labels."""
    from datasets import Dataset

    pairs, source = load_lengths(ROOT / "benchmarks" / "lengths.json", seed)
    cfg = SHAPES[shape]
    splits = {"train": pick_examples(pairs, n_train, seed, MAX_LENGTH),
              "validation": pick_examples(pairs, n_eval, seed + 1, MAX_LENGTH)}
    for split, chosen in splits.items():
        rows = make_train_examples(chosen, cfg["vocab_size"], cfg["eos_token_id"], seed + len(split))
        Dataset.from_dict({"id": [f"{split}-{i}" for i in range(len(rows))], "qtype": ["bench"] * len(rows),
                           "input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
                          ).save_to_disk(str(folder / split))
    train = splits["train"]
    return {"lengths": source, "train_examples": len(train), "train_tokens": sum(p + a for p, a in train),
            "longest": max(p + a for p, a in train)}


def run_params(base_params: dict, mode: str, procs: int, widest: int, args) -> dict:
    """params.yaml with the benchmark's work (LoRA r=16 alpha=16 on the seven projections) and this run's layout."""
    params = json.loads(json.dumps(base_params))
    params["lora"].update(r=16, alpha=16, dropout=0.05, target_modules=list(LORA_TARGETS))
    params["quant"]["mode"] = args.quant
    params["train"].update(
        distributed=mode, num_processes=procs, per_device_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation * widest // procs, max_steps=args.steps,
        learning_rate=args.lr, warmup_ratio=0.0, lr_scheduler="constant", packing=args.packing,
        gradient_checkpointing=args.checkpointing, eval_steps=0, save_steps=10 ** 6, logging_steps=1,
        report_to="none", optimizer="adamw_torch")
    if args.fsdp_wrap:
        params["train"]["fsdp_wrap"] = args.fsdp_wrap
    for item in args.set or ():
        key, value = item.split("=", 1)
        group, name = key.split(".", 1)
        params[group][name] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value
    return params


def stage_command(stage_args: list[str], params: dict, configs: str, profile: list[int] | None,
                  profile_dir: Path, limit_all_gathers: bool = True) -> list[str]:
    """`python -m stages.train ...` as dvc.yaml runs it, or, with profile (or an FSDP experiment),
    benchmarks.profile_stage put through the launcher here (the stage would relaunch itself without it)."""
    if not profile and limit_all_gathers:
        return [sys.executable, "-m", "stages.train", *stage_args]
    import torch

    from stages.lib.training import launch

    argv = ["--profile-dir", str(profile_dir), "--profile-steps", *map(str, profile or (0, 0)),
            *([] if limit_all_gathers else ["--no-limit-all-gathers"]), *stage_args]
    train = params["train"]
    if train["distributed"] == "none":
        return [sys.executable, "-m", "benchmarks.profile_stage", *argv]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return launch.launch_command(sys.executable, "benchmarks.profile_stage", argv, train["distributed"],
                                 train["num_processes"], device, configs)


def run_stage(tag: str, params: dict, work: Path, base: Path, tokenized: Path, timeout: int,
              configs: str = str(ROOT / "configs" / "accelerate"), profile: list[int] | None = None,
              limit_all_gathers: bool = True) -> dict:
    import yaml

    run = work / tag
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage_args = ["--params", str(run / "params.yaml"), "--tokenized", str(tokenized), "--base", str(base),
                  "--checkpoints", str(run / "checkpoints"), "--live", str(run / "live"), "--out", str(run / "adapter"),
                  "--metrics", str(run / "headline.json"), "--run-report", str(run / "metrics.json"),
                  "--launch-configs", configs]
    cmd = stage_command(stage_args, params, configs, profile, run / "profile", limit_all_gathers)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with GpuMemorySampler(run / "nvml.csv") as sampler, open(run / "stage.log", "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = (run / "stage.log").read_text().splitlines()[-40:]
        raise RuntimeError(f"{tag}: train stage exited {code}:\n" + "\n".join(tail))
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "adapter" / "training.json").read_text())["log_history"]
    out = {"metrics": metrics, "nvml_peak_gib": sampler.peaks_gib(), "nvml_start_gib": sampler.start_gib(),
           "stage_wall_s": round(wall, 1),
           "losses": [[h["step"], h["loss"]] for h in history if "loss" in h]}
    if "fsdp_units" in metrics:  # what ran: train.fsdp_wrap, but PEFT's units at one process
        out["fsdp_wrap"] = metrics["fsdp_units"]
    if profile:
        out["profile"] = [json.loads(p.read_text()) for p in sorted((run / "profile").glob("rank*.json"))]
    if not limit_all_gathers:
        out["limit_all_gathers"] = False
    return out


def make_row(shape: str, mode: str, procs: int, result: dict, data: dict) -> dict:
    m = result["metrics"]
    rate = m["tokens_per_second_steady"]
    profiled = {}
    if result.get("profile"):
        # the profiled steps are slowed by the profiler: the rate comes from the steps after them (rank 0's count
        # is the total over processes, as the stage's own)
        profiled = {"tokens_per_s_stage_incl_profiled": rate}
        rate = result["profile"][0]["tokens_per_s_after_profile"]
    return {"bench": "train-stage", "shape": shape, "recipe": f"project-{mode}", "processes": procs,
            "tokens_per_s": rate, **profiled, "tokens_per_s_whole_run": m["tokens_per_second"],
            "peak_gib": round(m["peak_memory_mb"] / 1024, 2),
            "peak_gib_per_process": [round(x / 1024, 2) for x in m["peak_memory_mb_per_process"]],
            "nvml_peak_gib": result["nvml_peak_gib"], "nvml_start_gib": result.get("nvml_start_gib"),
            "effective_batch": m["effective_batch_size"],
            "world_size": m["world_size"], "steps": m["global_step"], "precision": m["precision"],
            "speedups": m.get("speedups"), "train_seconds": m["train_seconds"], "stage_wall_s": result["stage_wall_s"],
            "final_train_loss": m["train_loss"], "losses": result["losses"], **data,
            **{k: result[k] for k in ("fsdp_wrap", "limit_all_gathers", "profile") if k in result}}


def add_scaling(rows: list[dict]) -> None:
    """Scaling efficiency and the largest loss gap against the 1-process run of the same mode."""
    for row in rows:
        ones = [r for r in rows if r["processes"] == 1]
        one = next((r for r in ones if r["recipe"] == row["recipe"]), ones[0] if ones else None)
        if one is None or row is one or not one["tokens_per_s"] or not row["tokens_per_s"]:
            continue
        row["speedup_vs_1"] = round(row["tokens_per_s"] / one["tokens_per_s"], 3)
        row["scaling_efficiency"] = round(row["speedup_vs_1"] / row["processes"], 3)
        base = dict((s, v) for s, v in one["losses"])
        gaps = [abs(v - base[s]) for s, v in row["losses"] if s in base]
        row["max_loss_gap_vs_1"] = round(max(gaps), 4) if gaps else None


def environment() -> dict:
    """bench_gpu's library versions and card, plus the GPU count the launcher sees."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"libraries": versions(), "gpus": torch.cuda.device_count(), "card": device_info(device)["name"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--runs", nargs="+", default=["fsdp:1", "fsdp:2"],
                        help="mode:processes, mode in none|ddp|fsdp (none needs 1)")
    parser.add_argument("--work", default="/tmp/bench_stage", help="scratch folder (base model, data, runs)")
    parser.add_argument("--out", required=True, help="results folder or .json path")
    parser.add_argument("--train-examples", type=int, default=512)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="train.per_device_batch_size")
    parser.add_argument("--accumulation", type=int, default=1, help="accumulation of the widest run")
    parser.add_argument("--steps", type=int, default=12, help="train.max_steps (first 2 are warm-up)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--quant", default="auto", help="quant.mode (auto: nf4 at 8B, bf16 at 135M on CUDA)")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", nargs="*", help="extra params overrides, group.key=value (JSON values)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--launch-configs", default=str(ROOT / "configs" / "accelerate"),
                        help="folder of accelerate configs (ddp.yaml, fsdp.yaml), e.g. a variant to compare")
    parser.add_argument("--profile", nargs=2, type=int, metavar=("FIRST", "LAST"),
                        help="profile these optimizer steps on every process (benchmarks/profile_stage.py); the "
                             "steady rate is then also read from the steps after them")
    parser.add_argument("--fsdp-wrap", choices=["layer", "lora"],
                        help="train.fsdp_wrap (default: params.yaml's): FSDP unit per decoder layer or per LoRA matrix")
    parser.add_argument("--limit-all-gathers", action=argparse.BooleanOptionalAction, default=True,
                        help="FSDP1's all-gather rate limiter (experiment: --no-limit-all-gathers)")
    parser.add_argument("--tag", default="", help="suffix of the run folders and labels (variants of one mode)")
    return parser.parse_args(argv)


def main(args) -> dict:
    import yaml

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = [(mode, int(n)) for mode, n in (r.split(":") for r in args.runs)]
    widest = max(n for _, n in runs)
    work = Path(args.work)
    base, tokenized = work / f"base-{args.shape}", work / f"tokenized-{args.shape}"
    t0 = time.perf_counter()
    write_base(base, args.shape, args.seed)
    data = write_tokenized(tokenized, args.shape, args.train_examples, args.eval_examples, args.seed)
    log.info("base + data ready in %.0f s: %s", time.perf_counter() - t0, data)
    env = environment()
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / f"{dt.date.today()}-{card_slug(env['card'])}-stage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"card": env["card"], "date": str(dt.date.today()), "command": "python3 -m benchmarks.bench_stage "
              + " ".join(sys.argv[1:]), "environment": env, "rows": []}
    base_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for mode, procs in runs:
        tag = f"{args.shape}-{mode}-{procs}{'-' + args.tag if args.tag else ''}"
        log.info("run %s", tag)
        try:
            res = run_stage(tag, run_params(base_params, mode, procs, widest, args), work, base, tokenized,
                            args.timeout, args.launch_configs, args.profile, args.limit_all_gathers)
            result["rows"].append(make_row(args.shape, mode, procs, res, data))
            if args.tag:
                result["rows"][-1]["variant"] = args.tag
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            log.error("%s failed: %s", tag, err)
            result["rows"].append({"bench": "train-stage", "shape": args.shape, "recipe": f"project-{mode}",
                                   "processes": procs, "error": str(err)[-3000:]})
        add_scaling([r for r in result["rows"] if "error" not in r])
        path.write_text(json.dumps(result, indent=2))
        log.info("%s: %s", tag, {k: v for k, v in result["rows"][-1].items() if k != "losses"})
    return result


if __name__ == "__main__":
    main(parse_args())
