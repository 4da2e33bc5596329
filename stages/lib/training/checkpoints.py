"""Checkpoints of the train stage: a folder per run identity (params + data + base weights), so stale state is never
resumed, and a finished checkpoint is reused instead of stepping again.

Crash safety: the Trainer's saves are written into <run>/.partial/ and renamed into place once whole
(AtomicCheckpointSaves), and before a checkpoint is resumed or reused it is checked (checkpoint_problem); a damaged
one is renamed out of the Trainer's sight (damaged-checkpoint-<step>-<n>, kept for inspection) and the next newest
whole one is used, or a fresh run when none is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from stages.lib.io import read_json, write_failure

log = logging.getLogger(__name__)

TIMING_FILE = "run_timing.json"  # in the run's checkpoint folder: the timings and peaks of the run that trained it
PARTIAL_DIR = ".partial"  # in the run's folder: a checkpoint being saved, renamed into place once whole
DAMAGED_PREFIX = "damaged-"  # set-aside checkpoints; neither get_last_checkpoint nor the Trainer's rotation sees them

# What a resumable checkpoint holds (any one name per row): PEFT adapter or full weights or FSDP's sharded folder;
# the optimizer as one file or FSDP's sharded folder; the scheduler; the TrainerState.
REQUIRED = (("weights", ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                         "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")),
            ("optimizer state", ("optimizer.pt", "optimizer_0", "optimizer.bin")),
            ("scheduler state", ("scheduler.pt",)),
            ("trainer state", ("trainer_state.json",)))


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


def file_problem(path: Path) -> str | None:
    """Why one checkpoint file cannot be read back, judged by its kind; None if it parses. Cheap: headers and
    archive directories, no tensor is loaded (a file cut short fails all of these)."""
    from safetensors import SafetensorError, safe_open

    kind = path.suffix
    if kind in (".safetensors", ".json", ".pt", ".pth", ".bin", ".distcp") and path.stat().st_size == 0:
        return "empty file"
    if kind == ".safetensors":
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            return f"unreadable safetensors ({err})"
    elif kind == ".json":
        try:
            read_json(path)
        except (ValueError, UnicodeDecodeError) as err:
            return f"not valid JSON ({err})"
    elif kind in (".pt", ".pth", ".bin"):
        # torch.save writes a zip archive; one cut short has no central directory at its end
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile:
            return "not a whole torch.save archive (cut short?)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed or reused (the first problem found), or None when it is whole:
    weights, optimizer, scheduler and trainer state present and every file of a known kind readable."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()}
    for what, options in REQUIRED:
        if not names & set(options):
            return f"no {what} ({' or '.join(options)})"
    if "adapter_model.safetensors" in names and "adapter_config.json" not in names:
        return "adapter_model.safetensors without its adapter_config.json"
    for path in sorted(folder.rglob("*")):
        problem = file_problem(path) if path.is_file() else None
        if problem:
            return f"{path.relative_to(folder)}: {problem}"
    for shards in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(("pytorch_model_fsdp",
                                                                                           "optimizer"))):
        if not (shards / ".metadata").is_file():  # torch.distributed.checkpoint writes it after the shards
            return f"{shards.name}: sharded state without its .metadata"
    state = read_json(folder / "trainer_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json: no global_step"
    return None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the Trainer's sight (kept for inspection, never deleted here)."""
    n = 1
    while (aside := folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{n}")).exists():
        n += 1
    os.replace(folder, aside)
    return aside


def newest_whole_checkpoint(ckpt_dir: Path, set_aside_damaged: bool = True) -> str | None:
    """The newest checkpoint under `ckpt_dir` that checkpoint_problem passes. Each damaged one newer than it is named
    in a warning and, when `set_aside_damaged` (under a launcher only rank 0 renames), set aside."""
    from transformers.trainer_utils import sort_checkpoints

    if not ckpt_dir.is_dir():
        return None
    if set_aside_damaged and (ckpt_dir / PARTIAL_DIR).exists():
        # a save that a kill interrupted: it was never renamed into place, so it never was a checkpoint
        log.warning("removing %s: a checkpoint save that did not finish", ckpt_dir / PARTIAL_DIR)
        shutil.rmtree(ckpt_dir / PARTIAL_DIR)
    damaged = 0
    for candidate in reversed(sort_checkpoints(str(ckpt_dir))):  # newest step first
        try:
            problem = checkpoint_problem(Path(candidate))
        except FileNotFoundError:  # under a launcher: rank 0 set it aside while this rank was reading it
            problem = "moved away while being checked"
        if problem is None:
            break
        damaged += 1
        if set_aside_damaged:
            log.warning("checkpoint %s is damaged (%s): set aside as %s", candidate, problem,
                        set_aside(Path(candidate)).name)
        else:
            log.warning("checkpoint %s is damaged (%s): skipped", candidate, problem)
    else:
        candidate = None
    if damaged:
        log.warning("%d damaged checkpoint(s) passed over; %s", damaged,
                    f"falling back to {candidate}" if candidate else "no whole checkpoint left: training from scratch")
    return candidate


def find_resume(ckpt_dir: Path, distributed: str, set_aside_damaged: bool = True):
    """(newest whole checkpoint to resume or None, its TrainerState when its schedule already finished or None).

    Damaged checkpoints are passed over (newest_whole_checkpoint). FSDP checkpoints are sharded, so a finished one is
    resumed (one step) rather than restored.
    """
    resume = newest_whole_checkpoint(ckpt_dir, set_aside_damaged)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> None:
    """Rename a whole checkpoint into place, its files flushed to disk first so that not even a power cut leaves a
    renamed folder with missing data."""
    for path in partial.rglob("*"):
        if path.is_file():
            _fsync(path)
    if final.exists():  # a whole checkpoint of the same step (not within one schedule): the new save replaces it
        log.info("replacing %s with the new save of the same step", final)
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(final.parent)
    partial.parent.rmdir()  # the staging folder holds one save at a time


def save_failure(final: Path, err: Exception) -> Exception:
    """The error for a checkpoint save that failed: names the checkpoint and the cause. torch.save reports a full
    disk as "file write failed", so the free space is given too."""
    if isinstance(err, OSError) and err.errno is not None:
        return write_failure(final, err)
    try:
        free = f"; {shutil.disk_usage(final.parent).free / 2**20:.0f} MiB free on that disk"
    except OSError:
        free = ""
    return RuntimeError(f"cannot save checkpoint {final}: {type(err).__name__}: {err}{free}; nothing was written "
                        "there, the previous checkpoints are kept and a rerun resumes from the newest")


class AtomicCheckpointSaves:
    """Trainer mixin (listed before the Trainer class): each checkpoint is saved into <run>/.partial/ and renamed into
    place once every process has written its part, so a kill or a full disk during a save leaves the previous
    checkpoints and no half-written checkpoint-<step> that a rerun would resume."""

    _saving = False

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, PARTIAL_DIR) if self._saving else run_dir

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        partial, final = run_dir / PARTIAL_DIR / name, run_dir / name
        if self.args.should_save and partial.exists():
            shutil.rmtree(partial)  # a failed save's leftovers; no rank writes before the barrier
        self.accelerator.wait_for_everyone()
        self._saving = True
        try:
            super()._save_checkpoint(model, trial)  # into partial; its rotation sees only that folder
        except Exception as err:
            if self.args.should_save:
                shutil.rmtree(partial.parent, ignore_errors=True)  # frees the space a full disk needs
            raise save_failure(final, err) from err
        finally:
            self._saving = False
        self.accelerator.wait_for_everyone()  # every process's shards and RNG state are in partial
        if self.args.should_save:
            publish(partial, final)
            # the Trainer's own rotation (keep save_total_limit, newest protected), now over the published ones
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()


def with_atomic_saves(trainer_class: type) -> type:
    """`trainer_class` whose checkpoint saves are whole or absent (AtomicCheckpointSaves)."""
    return type(f"Atomic{trainer_class.__name__}", (AtomicCheckpointSaves, trainer_class), {})
