"""Stage train: LoRA/QLoRA fine-tuning of models/base on data/tokenized with PEFT + TRL's SFTTrainer.

    python -m stages.train --params params.yaml --tokenized data/tokenized --base models/base \
        --checkpoints models/checkpoints --live reports/train/live --out models/adapter \
        --metrics reports/train/metrics.json --run-report reports/train/run.json

The model's set-up phases are in stages/lib/training/setup.py; checkpoints, callbacks, outputs in training/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.io import read_json, setup_logging, write_json
from stages.lib.model.loading import count_params_from_config, load_tokenizer
from stages.lib.model.precision import resolve_precision
from stages.lib.training import checkpoints, fsdp, launch, results, setup
from stages.lib.training.callbacks import live_callback, throughput_callback
from stages.lib.training.checks import check_tokenizer, check_training_setup, explain_training_oom
from stages.lib.training.lora import check_target_modules, count_parameters
from stages.lib.training.speedups import resolve_speedups
from stages.lib.versions import check_versions

PARAMS = ("lora", "quant", "train", "model.prompt_format")
KEYED = ("lora", "quant", "train")  # what the checkpoint key hashes; the prompt format is in the data's digest
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
             "safetensors")  # + dvclive when train.report_to is dvclive (GPU runs go without it)

log = logging.getLogger("stages.train")


def main(args, callbacks=()) -> dict | None:
    """`callbacks` are extra TrainerCallbacks (tests use one to interrupt a run)."""
    stage_start = time.perf_counter()
    setup_logging()
    params = load_params(args.params, PARAMS)
    lora, quant, train = params["lora"], params["quant"], params["train"]
    check_versions(LIBRARIES + (("dvclive",) if train.report_to == "dvclive" else ()))
    import torch

    base_info = read_json(Path(args.base) / "source.json")
    precision = resolve_precision(quant, count_params_from_config(args.base))
    cuda = precision.device == "cuda"
    check_training_setup(train, precision, dict(os.environ), torch.cuda.is_bf16_supported() if cuda else None,
                         torch.cuda.device_count() if cuda else None)
    check_target_modules(lora, args.base)  # on the config alone, before anything is loaded
    if train.distributed != "none" and not launch.under_launcher(os.environ):
        code = launch.relaunch(args, train, precision.device, args.launch_configs)
        if code != 0:
            raise SystemExit(f"train: the {train.num_processes}-process {train.distributed} run failed (exit {code})")
        return None
    rank, local_rank = launch.process_rank(os.environ)
    if cuda:
        torch.cuda.set_device(local_rank)  # before loading: 4-bit weights land on the current device
    log.info("precision: %s", precision.as_dict())

    from datasets import disable_caching, load_from_disk

    # TRL's packing maps the datasets; with caching on, the result lands beside them in data/tokenized (a DVC output)
    disable_caching()
    train_ds = load_from_disk(str(Path(args.tokenized) / "train"))
    eval_ds = load_from_disk(str(Path(args.tokenized) / "validation"))
    key = checkpoints.run_key({g: params[g] for g in KEYED}, checkpoints.data_digest(Path(args.tokenized)), base_info["weights_sha256"])
    ckpt_dir = Path(args.checkpoints) / key
    resume, finished = checkpoints.find_resume(ckpt_dir, train.distributed, set_aside_damaged=rank == 0)
    log.info("checkpoints: %s (%s)", ckpt_dir, "already complete: reusing it" if finished else
             f"resuming from {resume}" if resume else "fresh run")

    tokenizer = load_tokenizer(args.base)
    check_tokenizer(tokenizer, args.base, params["model.prompt_format"])
    speedups = resolve_speedups(train, precision)
    model, peft_config, speedups = setup.prepare_model(args.base, precision, quant, train, lora, speedups, local_rank,
                                                       base_info.get("added_tokens"))
    log.info("speedups: %s", speedups.as_dict())
    max_length = max(len(ids) for ds in (train_ds, eval_ds) for ids in ds["input_ids"])
    sft_args = setup.build_sft_config(train, precision, ckpt_dir, max_length, resume is not None)
    if train.distributed == "none" and sft_args.n_gpu > 1:
        # one process on a multi-GPU host: use one GPU (the Trainer would pick nn.DataParallel, which TRL refuses);
        # several GPUs are train.distributed: ddp
        sft_args._n_gpu = 1
        log.info("%d GPUs visible, train.distributed is none: training on cuda:0 only", torch.cuda.device_count())
    timer = throughput_callback()
    live = live_callback(Path(args.live)) if train.report_to == "dvclive" and rank == 0 else None
    trainer = setup.build_trainer(speedups, precision, model=model, args=sft_args, train_dataset=train_ds,
                                  eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=[timer, *callbacks, *([live] if live is not None else [])])
    counts = count_parameters(trainer.model, peft_config)
    sharded = train.distributed == "fsdp"
    # PEFT's file key of each adapter weight, read before FSDP renames the modules it wraps
    adapter_keys = fsdp.adapter_file_keys(trainer.model) if sharded else None
    world = trainer.args.world_size
    units = fsdp.choose_units(train.fsdp_wrap, world) if sharded else None
    if units is not None:
        log.info("FSDP units: %s (train.fsdp_wrap %s, %d processes)", units, train.fsdp_wrap, world)
    effective_batch = train.per_device_batch_size * world * train.gradient_accumulation_steps
    log.info("trainable params %s of %s (%.3f%%); effective batch %d = %d per device x %d processes x %d accumulation",
             f"{counts['trainable']:,}", f"{counts['total']:,}", counts["trainable_percent"], effective_batch,
             train.per_device_batch_size, world, train.gradient_accumulation_steps)

    with fsdp.layer_units() if units == "layer" else contextlib.nullcontext(), explain_training_oom(train, effective_batch):
        timing = checkpoints.train_or_reuse(trainer, resume, finished, timer, live, ckpt_dir / checkpoints.TIMING_FILE)
    peaks = timing.get("peaks") or results.gather_from_ranks(results.peak_memory_mb(precision.device)[0])
    # the sharded adapter gathered unit by unit (every rank takes part; rank 0 gets it). FSDP's own full state dict
    # would gather the frozen model too, and fails at one process with LoRA and frozen weights in one unit.
    full_state = fsdp.gather_full_params(trainer.model_wrapped, adapter_keys) if adapter_keys else None
    if not trainer.is_world_process_zero():
        return None  # under a launcher, rank 0 alone writes outputs
    if not finished:
        write_json(ckpt_dir / checkpoints.TIMING_FILE, {**timing, "peaks": peaks})

    metrics = results.collect_metrics(trainer, timing, resume is not None, counts, precision, key, effective_batch,
                                      (len(train_ds), len(eval_ds)), peaks)
    metrics["stage_wall_seconds"] = round(time.perf_counter() - stage_start, 1)
    metrics["stage_cpu_seconds"] = round(time.process_time(), 1)
    metrics["speedups"] = speedups.as_dict()
    if units is not None:
        metrics["fsdp_units"] = units
    info = results.adapter_info(base_info, precision, params, effective_batch, key, metrics, trainer.state.log_history)
    results.write_adapter(args.out, trainer, info, base_info, full_state, adapter_keys, params["model.prompt_format"])
    write_json(args.run_report, metrics)
    write_json(args.metrics, {k: metrics.get(k) for k in results.HEADLINE})
    log.info("eval perplexity %s (base %s, change %s); %s tokens/s; adapter in %s",
             metrics["eval_perplexity"], metrics["base_eval_perplexity"], metrics.get("perplexity_change"),
             metrics["tokens_per_second"], args.out)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokenized", required=True, help="folder with train/ and validation/ datasets")
    parser.add_argument("--base", required=True, help="base model folder (models/base)")
    parser.add_argument("--checkpoints", required=True, help="persisted folder for resumable checkpoints")
    parser.add_argument("--live", required=True, help="dvclive folder (plots under <live>/plots/metrics)")
    parser.add_argument("--out", required=True, help="adapter folder to write (models/adapter)")
    parser.add_argument("--metrics", required=True, help="headline metrics JSON (reports/train/metrics.json)")
    parser.add_argument("--run-report", required=True,
                        help="JSON with every number of the run: speed, memory, precision, hardware, versions")
    parser.add_argument("--launch-configs", default="configs/accelerate",
                        help="folder with the accelerate configs ddp.yaml / fsdp.yaml (train.distributed)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
