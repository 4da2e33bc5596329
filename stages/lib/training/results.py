"""What the train stage reports and writes: headline and run metrics, the log history kept with the adapter, and
the adapter folder itself (weights, card, training.json, base_model.json), written atomically."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from stages.lib.io import atomic_dir, run_metadata, write_json
from stages.lib.training import fsdp
from stages.lib.training.lora import sort_adapter_config


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
    """The run report (reports/train/run.json): losses and perplexities (base vs fine-tuned), speed, memory, sizes,
    provenance.

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
        # the embedding rows trained for tokens model.prompt_format added (part of trainable_params); only then
        **({"added_token_params": counts["added_token_params"]} if "added_token_params" in counts else {}),
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


def adapter_info(base_info: dict, precision, params: dict, effective_batch: int, key: str, metrics: dict,
                 history: list[dict]) -> dict:
    """training.json: only what follows from the inputs, so a retrain that gives the same weights gives the same
    bytes (timings, memory and machine go to the run report)."""
    return {"base_source": base_info["source"], "base_checksum": base_info["weights_sha256"],
            "precision": precision.as_dict(), "lora": dataclasses.asdict(params["lora"]),
            "train": dataclasses.asdict(params["train"]), "quant": dataclasses.asdict(params["quant"]),
            "effective_batch_size": effective_batch, "run_key": key,
            "metrics": {k: metrics.get(k) for k in (*HEADLINE, "global_step", "trainable_params", "total_params",
                                                "train_examples", "eval_examples")},
            "log_history": deterministic_history(history)}


def write_adapter(out: str | Path, trainer, info: dict, base_info: dict, full_state=None, adapter_keys=None,
                  prompt_format: str = "chat") -> None:
    """The adapter folder, all or nothing: PEFT's weights and config (or the gathered FSDP shards), card,
    training.json, and base_model.json (ask/export refuse an adapter whose base weights differ from theirs)."""
    with atomic_dir(out) as tmp:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if full_state is None:
            peft_model.save_pretrained(str(tmp))
            sort_adapter_config(tmp, peft_model.peft_config["default"])
        else:
            fsdp.save_adapter(peft_model, full_state, adapter_keys, tmp)
        (tmp / "README.md").write_text(render_adapter_card(info), encoding="utf-8")  # replaces PEFT's template
        write_json(tmp / "training.json", info)
        # the prompt format travels with the adapter (ask, evaluate, export refuse another); "chat" is left out so
        # an adapter trained with the default keeps the bytes it had before the param existed
        fmt = {} if prompt_format == "chat" else {"prompt_format": prompt_format}
        write_json(tmp / "base_model.json", {"weights_sha256": base_info["weights_sha256"],
                                             "source": base_info["source"], **fmt})
