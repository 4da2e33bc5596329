"""Checkpoints of the train stage: a folder per run identity (params + data + base weights), so stale state is never
resumed, and a finished checkpoint is reused instead of stepping again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from stages.lib.io import read_json

TIMING_FILE = "run_timing.json"  # in the run's checkpoint folder: the timings and peaks of the run that trained it


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


def find_resume(ckpt_dir: Path, distributed: str):
    """(last checkpoint to resume or None, its TrainerState when its schedule already finished or None).

    FSDP checkpoints are sharded, so a finished one is resumed (one step) rather than restored.
    """
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    return resume, completed_state(resume) if distributed != "fsdp" else None


def train_or_reuse(trainer, resume: str | None, finished, timer, live, timing_file: Path) -> dict:
    """Train (from `resume` when given), or restore a finished checkpoint; then make sure the last entry of the
    history is an evaluation of the final adapter. Returns the run's timings: the Throughput callback's, or those
    the run that finished the checkpoint saved in timing_file (this process only loaded and evaluated)."""
    if finished:
        restore_completed(trainer, resume, finished)
        timing = {**(read_json(timing_file) if timing_file.is_file() else {}), "reused": True,
                  "step0": finished.global_step}
        if live is not None:
            live.replay(finished.log_history)
            live.live.end()
    else:
        trainer.train(resume_from_checkpoint=resume)
        timing = timer.timing
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        trainer.evaluate()  # the final adapter's number, if the schedule did not end on an eval step
    return timing
