"""Stage train: LoRA/QLoRA fine-tuning of models/base on data/tokenized with PEFT + TRL's SFTTrainer.

    python -m stages.train --params params.yaml --tokenized data/tokenized --base models/base \
        --checkpoints models/checkpoints --live reports/train/live --out models/adapter \
        --metrics reports/train/metrics.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from stages.lib import fastpath, launch, modeling, sharding, speedups
from stages.lib.config import ConfigError, load_params
from stages.lib.io import atomic_dir, read_json, run_metadata, setup_logging, write_json
from stages.lib.versions import check_versions

PARAMS = ("lora", "quant", "train")
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
             "safetensors")  # + dvclive when train.report_to is dvclive (GPU runs go without it)

log = logging.getLogger("stages.train")


def data_digest(tokenized: Path) -> str:
    """sha256 over the tokenized splits' Arrow data files as each split's state.json lists them (not the JSON state,
    which holds a random fingerprint, nor any cache-*.arrow a `datasets` map left beside them)."""
    digest = hashlib.sha256()
    for state in sorted(Path(tokenized).rglob("state.json")):
        files = [f["filename"] for f in read_json(state).get("_data_files", [])]
        if not files:
            raise ValueError(f"{state}: lists no data files; re-run the tokenize stage")
        for path in (state.parent / name for name in files):
            digest.update(f"{path.relative_to(tokenized).as_posix()}\n".encode())
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def run_key(params: dict, data_sha: str, base_sha: str) -> str:
    """Checkpoint folder name: changes whenever a param or an input changes, so stale state is never resumed."""
    blob = json.dumps({"params": {k: dataclasses.asdict(v) for k, v in sorted(params.items())},
                       "data": data_sha, "base": base_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_sft_config(train, precision, output_dir: Path, max_length: int, resume: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps > 0 else -1,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=train.weight_decay,
        optim=modeling.choose_optimizer(train.optimizer, precision),
        gradient_checkpointing=train.gradient_checkpointing,
        # FSDP1 with flat parameters needs reentrant checkpointing (PEFT's FSDP + QLoRA recipe)
        gradient_checkpointing_kwargs={"use_reentrant": train.distributed == "fsdp"},
        # on CPU this also makes a torchrun launch use gloo instead of looking for GPUs
        use_cpu=precision.device == "cpu",
        # bfd packing turns on padding-free batches (position ids, no cross-example attention)
        packing=train.packing,
        packing_strategy="bfd",
        # sequences are already cut to tokenize.max_length; only packing needs a length (the block size)
        max_length=max_length if train.packing else None,
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy="steps" if train.eval_steps > 0 else "no",
        eval_steps=train.eval_steps or None,
        # step-0 evaluation = the base model (LoRA starts as a no-op): the bar the fine-tune must beat
        eval_on_start=not resume,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        report_to="none",  # dvclive is added as an explicit callback writing to --live
        # CPU trains in float32 (bf16 is ~25x slower there); SFTConfig would default to bf16
        bf16=precision.device == "cuda" and precision.dtype == "bfloat16",
        fp16=precision.device == "cuda" and precision.dtype == "float16",
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False if train.distributed == "ddp" else None,
        dataloader_num_workers=0,
    )


def live_callback(live_dir: Path):
    """transformers' DVCLive callback, logging at the trainer's global step (x: step in dvc.yaml) and
    replaying the restored history after a resume, so the plots are whole."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepDVCLiveCallback(DVCLiveCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            super().on_train_begin(args, state, control, model=model, **kwargs)
            self.replay(state.log_history if state.global_step > 0 else ())

        def replay(self, history):
            """Log a restored history (a resumed or an already finished run), so the plots are whole."""
            for entry in history:
                self._log_at(entry.get("step", 0), entry)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not self._initialized:
                self.setup(args, state, model)
            if state.is_world_process_zero:
                self._log_at(state.global_step, logs or {})

        def _log_at(self, step: int, logs: dict):
            if is_run_summary(logs):
                return  # its numbers are in metrics.json
            self.live.step = step
            for key, value in logs.items():
                if (key not in ("step", "epoch") and not is_wall_clock(key) and isinstance(value, (int, float))
                        and not isinstance(value, bool)):
                    # eval/loss and train/loss side by side in `dvc plots show`
                    name = (f"eval/{key[5:]}" if key.startswith("eval_")
                            else f"train/{key[6:]}" if key.startswith("train_") else f"train/{key}")
                    self.live.log_metric(name, value)
            self.live.make_summary()

    # dvcyaml=False: dvc.yaml already declares the plots; save_dvc_exp=False: `dvc exp run` owns experiments
    return StepDVCLiveCallback(live=Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None))


WARMUP_STEPS = 2  # steps left out of the steady-state rate (kernel autotuning, allocator growth, first gathers)


def throughput_callback():
    """Times this run's training (evaluation excluded) and counts the non-pad tokens it trained on, summed over
    processes; also the steady-state rate after WARMUP_STEPS steps, which is what throughput comparisons use."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        timing: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.eval_seconds, self.mark, self.last = time.perf_counter(), 0.0, None, None
            self.step0, self.tokens0 = state.global_step, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.eval_seconds += (logs or {}).get("eval_runtime", 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            # called before that step's evaluation and checkpoint save, so neither is in the steady window
            self.last = (time.perf_counter(), self.eval_seconds, state.num_input_tokens_seen)
            if state.global_step - self.step0 == WARMUP_STEPS:
                self.mark = self.last

        def on_train_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start - self.eval_seconds
            steady = None
            if self.mark is not None and self.last is not self.mark:
                (t0, ev0, n0), (t1, ev1, n1) = self.mark, self.last
                steady = (n1 - n0) / max(t1 - t0 - (ev1 - ev0), 1e-9)
            self.timing = {"steps": state.global_step - self.step0, "seconds": seconds,
                           "tokens": state.num_input_tokens_seen - self.tokens0, "eval_seconds": self.eval_seconds,
                           "step0": self.step0, "steady_tokens_per_second": steady}

    return Throughput()


def summarize_history(history: list[dict]) -> dict:
    """Base (step-0) and final eval loss, last train loss, from the trainer's log history."""
    evals = [h for h in history if "eval_loss" in h]
    base = next((h for h in evals if h.get("step") == 0), None)
    final = evals[-1] if evals and evals[-1].get("step", 0) > 0 else None
    train = [h for h in history if "loss" in h]
    out = {"train_loss": train[-1]["loss"] if train else None,
           "eval_loss": final["eval_loss"] if final else None,
           "base_eval_loss": base["eval_loss"] if base else None}
    for name in ("eval", "base_eval"):
        loss = out[f"{name}_loss"]
        out[f"{name}_perplexity"] = math.exp(loss) if loss is not None else None
    if out["eval_perplexity"] and out["base_eval_perplexity"]:
        out["perplexity_change"] = out["eval_perplexity"] / out["base_eval_perplexity"] - 1
    return out


# reports/train/metrics.json: what `dvc exp show` compares across runs (the rest is in the run report)
HEADLINE = ("eval_perplexity", "base_eval_perplexity", "perplexity_change", "eval_loss", "train_loss")


def is_wall_clock(key: str) -> bool:
    """A log entry that measures time (runtimes, per-second rates) rather than the model."""
    return key.endswith("_runtime") or key.endswith("_per_second")


def is_run_summary(entry: dict) -> bool:
    """The Trainer's end-of-training summary (runtime, mean train loss, flos): logged when train() returns, so a
    checkpoint never holds it and a reused finished run has none."""
    return "train_loss" in entry


def deterministic_history(history: list[dict]) -> list[dict]:
    """The trainer's log history without wall-clock entries or the end-of-training summary, keys sorted (a restored
    checkpoint's history comes back from JSON in sorted order), so identical training gives identical bytes whether
    it just ran or a finished checkpoint was reused."""
    return [{k: v for k, v in sorted(entry.items()) if not is_wall_clock(k)}
            for entry in history if not is_run_summary(entry)]


def peak_memory_mb(device: str) -> tuple[float, str]:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # ru_maxrss is KiB on Linux


def gather_from_ranks(value):
    """[value of rank 0, rank 1, ...] under a launcher (a collective: every rank calls it); [value] otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def render_adapter_card(info: dict) -> str:
    m = info["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return "\n".join([
        "# LoRA adapter for MedQuAD medical question answering",
        "",
        f"- Base model: `{info['base_source']}` (weights sha256 `{info['base_checksum']}`); "
        "load with `PeftModel.from_pretrained(base, this_folder)` on exactly that base",
        "- Precision during training: {device} {dtype}, quantization {quant} ({reason})".format(**info["precision"]),
        f"- LoRA: {info['lora']}",
        f"- Steps: {m['global_step']}, effective batch {info['effective_batch_size']}",
        f"- Validation answer-token perplexity: base {fmt(m['base_eval_perplexity'])} -> fine-tuned "
        f"{fmt(m['eval_perplexity'])}",
        "- Trained on MedQuAD (NIH question-answer pairs). Not medical advice; answers can be wrong.",
        "",
        "Built by the `train` stage (`dvc repro train`); see reports/train/metrics.json.",
        "",
    ])


def collect_metrics(trainer, timing: dict, resumed: bool, counts: dict, precision, key: str, effective_batch: int,
                    examples: tuple[int, int], peaks: list[float]) -> dict:
    """reports/train/metrics.json: losses and perplexities (base vs fine-tuned), speed, memory, sizes, provenance.

    timing: the Throughput callback's numbers (or those saved by the run that completed this checkpoint);
    peaks: peak memory (MB) of every process, rank order.
    """
    import torch

    summary = summarize_history(trainer.state.log_history)
    seconds, steps, tokens = timing.get("seconds"), timing.get("steps"), timing.get("tokens")
    timed = bool(seconds) and steps is not None and tokens is not None
    steady = timing.get("steady_tokens_per_second")
    return {
        **summary,
        "global_step": trainer.state.global_step,
        "resumed_from_step": timing.get("step0") if resumed else None,
        "steps_this_run": 0 if timing.get("reused") else steps,
        # the checkpoint was already complete: no step ran, the timings are those of the run that completed it
        "reused_completed_run": bool(timing.get("reused")),
        "train_seconds": round(seconds, 2) if seconds is not None else None,
        "steps_per_second": round(steps / seconds, 4) if timed else None,
        # non-pad tokens trained on per second, all processes together
        "tokens_per_second": round(tokens / seconds, 1) if timed else None,
        "tokens_per_second_steady": round(steady, 1) if steady else None,
        "eval_seconds": round(timing.get("eval_seconds") or 0.0, 2),
        "stage_wall_seconds": None,  # filled by main at the end
        # CPU time of this process: comparable across runs on a machine shared with other jobs, unlike wall time
        "stage_cpu_seconds": None,
        "peak_memory_mb": round(max(peaks), 1),
        "peak_memory_mb_per_process": [round(p, 1) for p in peaks],
        "peak_memory_kind": peak_memory_mb(precision.device)[1],
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_percent": counts["trainable_percent"],
        "effective_batch_size": effective_batch,
        "world_size": trainer.args.world_size,
        "train_examples": examples[0],  # before packing merges them into rows
        "eval_examples": examples[1],
        "precision": precision.as_dict(),
        "run_key": key,
        "hardware": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if precision.device == "cuda" else None},
        "metadata": run_metadata(),
    }


def prepare_model(base: str, precision, quant, train, lora, levers, local_rank: int = 0):
    """The base model loaded for training, its validated LoRA config and the speed levers it allows (errors before
    any step runs)."""
    sharded = train.distributed == "fsdp"
    model = modeling.load_base_model(base, precision, quant.double_quant, local_rank=local_rank, sharded=sharded)
    if sharded:
        # FSDP1 flattens each unit into one tensor of one dtype: no fp32 upcast of norms/embeddings here
        # (prepare_model_for_kbit_training's), everything stays in the compute dtype, 4-bit storage included.
        # Checkpointing is left to the Trainer, which FSDP needs reentrant (build_sft_config).
        fastpath.freeze_for_lora(model, gradient_checkpointing=False)
    quantized = precision.quant != "none" and not sharded
    model, levers = speedups.apply_model_levers(model, levers, train, quantized=quantized)
    if train.packing and not modeling.packing_supported(model):
        raise ConfigError(f"params.yaml [train]: packing needs a model that keeps packed sequences apart from "
                          f"position_ids; {type(model).__name__} does not here, set packing: false")
    return model, modeling.build_lora_config(lora, model), levers


def relaunch(args, train, device: str) -> int:
    """Run this stage again through the launcher with train.num_processes processes; returns its exit code.

    `dvc repro` starts one plain process; the children see WORLD_SIZE and train. Rank 0 writes the outputs.
    """
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None]
    cmd = launch.launch_command(sys.executable, "stages.train", argv, train.distributed, train.num_processes,
                                device, getattr(args, "launch_configs", None) or build_parser().get_default("launch_configs"))
    log.info("train.distributed=%s: relaunching with %d processes: %s", train.distributed, train.num_processes,
             " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def completed_state(resume: str | None):
    """The TrainerState of a checkpoint whose schedule already finished, else None.

    Resuming such a checkpoint would still run one more optimizer step (the Trainer steps before it checks
    max_steps), which changes the adapter whenever the last learning rate is not 0.
    """
    if resume is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def restore_completed(trainer, resume: str, state) -> None:
    """Load a finished checkpoint's adapter and history into the trainer instead of training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(resume) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{resume}: finished checkpoint without adapter_model.safetensors; delete the "
                                "folder to train again")
    set_peft_model_state_dict(trainer.model, load_file(str(weights)))
    trainer.state = state


def main(args, callbacks=()) -> dict | None:
    """`callbacks` are extra TrainerCallbacks (tests use one to interrupt a run)."""
    stage_start = time.perf_counter()
    setup_logging()
    params = load_params(args.params, PARAMS)
    lora, quant, train = params["lora"], params["quant"], params["train"]
    check_versions(LIBRARIES + (("dvclive",) if train.report_to == "dvclive" else ()))
    import torch

    base_info = read_json(Path(args.base) / "source.json")
    precision = modeling.resolve_precision(quant, modeling.count_params_from_config(args.base))
    bf16_ok = torch.cuda.is_bf16_supported() if precision.device == "cuda" else None
    gpus = torch.cuda.device_count() if precision.device == "cuda" else None
    modeling.check_training_setup(train, precision, dict(os.environ), bf16_ok, gpus)
    if train.distributed != "none" and not launch.under_launcher(os.environ):
        code = relaunch(args, train, precision.device)
        if code != 0:
            raise SystemExit(f"train: the {train.num_processes}-process {train.distributed} run failed (exit {code})")
        return None
    rank, local_rank = launch.process_rank(os.environ)
    if precision.device == "cuda":
        torch.cuda.set_device(local_rank)  # before loading: 4-bit weights land on the current device
    log.info("precision: %s", precision.as_dict())
    levers = speedups.resolve_speedups(train, precision)

    from datasets import disable_caching, load_from_disk
    from transformers.trainer_utils import get_last_checkpoint

    # TRL's packing maps the datasets; with caching on, the result lands beside them in data/tokenized (a DVC output)
    disable_caching()
    train_ds = load_from_disk(str(Path(args.tokenized) / "train"))
    eval_ds = load_from_disk(str(Path(args.tokenized) / "validation"))
    key = run_key(params, data_digest(Path(args.tokenized)), base_info["weights_sha256"])
    ckpt_dir = Path(args.checkpoints) / key
    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    finished = completed_state(resume) if train.distributed != "fsdp" else None  # FSDP checkpoints are sharded
    log.info("checkpoints: %s (%s)", ckpt_dir, "already complete: reusing it" if finished else
             f"resuming from {resume}" if resume else "fresh run")

    tokenizer = modeling.load_tokenizer(args.base)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{args.base}: pad token must exist and differ from EOS (rerun base_model)")
    model, peft_config, levers = prepare_model(args.base, precision, quant, train, lora, levers, local_rank)
    log.info("speedups: %s", levers.as_dict())
    max_length = max(len(ids) for ds in (train_ds, eval_ds) for ids in ds["input_ids"])
    sft_args = build_sft_config(train, precision, ckpt_dir, max_length, resume is not None)
    if train.distributed == "none" and sft_args.n_gpu > 1:
        # one process on a multi-GPU host: use one GPU (the Trainer would pick nn.DataParallel, which TRL refuses);
        # several GPUs are train.distributed: ddp
        sft_args._n_gpu = 1
        log.info("%d GPUs visible, train.distributed is none: training on cuda:0 only", torch.cuda.device_count())
    timer = throughput_callback()
    extra = [timer, *callbacks]
    live = live_callback(Path(args.live)) if train.report_to == "dvclive" and rank == 0 else None
    extra += [live] if live is not None else []
    trainer = speedups.build_trainer(levers, model=model, args=sft_args, train_dataset=train_ds,
                                     eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config,
                                     callbacks=extra)
    if precision.quant != "none" and precision.dtype == "float32":
        # TRL keeps QLoRA adapters in bf16 (the paper's GPU recipe); on float32 compute that only adds casts
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    counts = modeling.count_parameters(trainer.model)
    # under FSDP: PEFT's file key of each adapter weight, read while PEFT's modules still have their own names (FSDP
    # renames them when it wraps the layers)
    adapter_keys = sharding.adapter_file_keys(trainer.model) if train.distributed == "fsdp" else None
    world = trainer.args.world_size
    units = sharding.choose_units(train.fsdp_wrap, world) if train.distributed == "fsdp" else None
    if units is not None:
        log.info("FSDP units: %s (train.fsdp_wrap %s, %d processes)", units, train.fsdp_wrap, world)
    effective_batch = train.per_device_batch_size * world * train.gradient_accumulation_steps
    log.info("trainable params %s of %s (%.3f%%); effective batch %d = %d per device x %d processes x %d accumulation",
             f"{counts['trainable']:,}", f"{counts['total']:,}", counts["trainable_percent"], effective_batch,
             train.per_device_batch_size, world, train.gradient_accumulation_steps)

    timing_file = ckpt_dir / "run_timing.json"
    if finished:
        restore_completed(trainer, resume, finished)
        # the finished run's own timings and peaks (this process only loaded and evaluated)
        timing = {**(read_json(timing_file) if timing_file.is_file() else {}), "reused": True,
                  "step0": finished.global_step}
        if live is not None:
            live.replay(finished.log_history)
            live.live.end()
    else:
        with sharding.layer_units() if units == "layer" else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=resume)
        timing = timer.timing
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        trainer.evaluate()  # the final adapter's number, if the schedule did not end on an eval step
    peaks = timing.get("peaks") or gather_from_ranks(peak_memory_mb(precision.device)[0])
    # the sharded adapter gathered unit by unit (every rank takes part; rank 0 gets it). FSDP's own full state dict
    # would gather the frozen model too, and fails at one process with LoRA and frozen weights in one unit.
    full_state = sharding.gather_full_params(trainer.model_wrapped, adapter_keys) if adapter_keys else None
    if not trainer.is_world_process_zero():
        return None  # under a launcher, rank 0 alone writes outputs
    if not finished:
        write_json(timing_file, {**timing, "peaks": peaks})

    metrics = collect_metrics(trainer, timing, resume is not None, counts, precision, key, effective_batch,
                              (len(train_ds), len(eval_ds)), peaks)
    metrics["stage_wall_seconds"] = round(time.perf_counter() - stage_start, 1)
    metrics["stage_cpu_seconds"] = round(time.process_time(), 1)
    metrics["speedups"] = levers.as_dict()
    if units is not None:
        metrics["fsdp_units"] = units
    # training.json travels with the adapter (a cached output): only what follows from the inputs, so a retrain
    # that gives the same weights gives the same bytes; timings, memory and machine go to --run-report
    info = {"base_source": base_info["source"], "base_checksum": base_info["weights_sha256"],
            "precision": precision.as_dict(), "lora": dataclasses.asdict(lora), "train": dataclasses.asdict(train),
            "quant": dataclasses.asdict(quant), "effective_batch_size": effective_batch, "run_key": key,
            "metrics": {k: metrics.get(k) for k in (*HEADLINE, "global_step", "trainable_params", "total_params",
                                                "train_examples", "eval_examples")},
            "log_history": deterministic_history(trainer.state.log_history)}
    with atomic_dir(args.out) as tmp:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if full_state is None:
            peft_model.save_pretrained(str(tmp))
            modeling.sort_adapter_config(tmp, peft_model.peft_config["default"])
        else:
            sharding.save_adapter(peft_model, full_state, adapter_keys, tmp)
        (tmp / "README.md").write_text(render_adapter_card(info), encoding="utf-8")  # replaces PEFT's template
        write_json(tmp / "training.json", info)
        # ask/export refuse an adapter whose base weights differ from the models/base they are given
        write_json(tmp / "base_model.json", {"weights_sha256": base_info["weights_sha256"],
                                             "source": base_info["source"]})
    write_json(args.run_report, metrics)
    write_json(args.metrics, {k: metrics.get(k) for k in HEADLINE})
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
