"""stages/lib/training/checkpoints.py: what makes a checkpoint whole, and damaged ones set aside, on real checkpoints
of the tiny model damaged the way a crash, a kill or a full disk leaves them."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

from helpers import make_args

from stages.lib.training import checkpoints


@pytest.fixture(scope="module")
def whole_checkpoint(workspace) -> Path:
    """A checkpoint the train stage wrote (one step of the tiny model)."""
    from stages import train as stage

    args = make_args(workspace, "probe", checkpoints="ckpt_probe",
                     train={"max_steps": 1, "save_steps": 1, "eval_steps": 0})
    metrics = stage.main(args)
    return Path(args.checkpoints) / metrics["run_key"] / "checkpoint-1"


def cut(path: Path, keep: float | int = 0.5) -> None:
    """Truncate a file as an interrupted write leaves it: `keep` a fraction or a byte count of its start."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])


def copy_to(src: Path, folder: Path, step: int) -> Path:
    return Path(shutil.copytree(src, folder / f"checkpoint-{step}"))


def test_a_checkpoint_the_stage_wrote_is_whole(whole_checkpoint):
    names = {p.name for p in whole_checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json", "rng_state.pth"} <= names
    assert checkpoints.checkpoint_problem(whole_checkpoint) is None
    # the save went through the staging folder, which is gone once the checkpoint is renamed into place
    assert not (whole_checkpoint.parent / checkpoints.PARTIAL_DIR).exists()


@pytest.mark.parametrize("damage,message", [
    (lambda c: cut(c / "adapter_model.safetensors"), r"adapter_model.safetensors: unreadable safetensors"),
    (lambda c: cut(c / "adapter_model.safetensors", 5), r"adapter_model.safetensors: unreadable.*header too small"),
    (lambda c: (c / "adapter_model.safetensors").unlink(), r"no weights \(adapter_model.safetensors or"),
    (lambda c: (c / "adapter_config.json").unlink(), r"without its adapter_config.json"),
    (lambda c: cut(c / "trainer_state.json"), r"trainer_state.json: not valid JSON"),
    (lambda c: (c / "trainer_state.json").write_text("[]"), r"trainer_state.json: no global_step"),
    (lambda c: (c / "trainer_state.json").unlink(), r"no trainer state \(trainer_state.json\)"),
    (lambda c: cut(c / "optimizer.pt", 0), r"optimizer.pt: empty file"),
    (lambda c: cut(c / "optimizer.pt", 0.9), r"optimizer.pt: not a whole torch.save archive"),
    (lambda c: (c / "optimizer.pt").unlink(), r"no optimizer state"),
    (lambda c: (c / "scheduler.pt").unlink(), r"no scheduler state \(scheduler.pt\)"),
    (lambda c: cut(c / "scheduler.pt"), r"scheduler.pt: not a whole torch.save archive"),
    (lambda c: cut(c / "rng_state.pth"), r"rng_state.pth: not a whole torch.save archive"),
], ids=["safetensors-cut", "safetensors-header-cut", "no-weights", "no-adapter-config", "state-cut",
        "state-not-a-state", "no-state", "optimizer-empty", "optimizer-cut", "no-optimizer", "no-scheduler",
        "scheduler-cut", "rng-cut"])
def test_each_kind_of_damage_is_found_and_named(whole_checkpoint, tmp_path, damage, message):
    folder = copy_to(whole_checkpoint, tmp_path, 1)
    damage(folder)
    problem = checkpoints.checkpoint_problem(folder)
    assert problem is not None and re.search(message, problem), problem


def test_sharded_state_needs_its_metadata(whole_checkpoint, tmp_path):
    """FSDP's sharded optimizer folder (torch.distributed.checkpoint) is whole only with the .metadata written last."""
    folder = copy_to(whole_checkpoint, tmp_path, 1)
    (folder / "optimizer.pt").unlink()
    (folder / "optimizer_0").mkdir()
    (folder / "optimizer_0" / "__0_0.distcp").write_bytes(b"shard")
    assert checkpoints.checkpoint_problem(folder) == "optimizer_0: sharded state without its .metadata"
    (folder / "optimizer_0" / "__1_0.distcp").write_bytes(b"")
    (folder / "optimizer_0" / ".metadata").write_bytes(b"meta")
    assert checkpoints.checkpoint_problem(folder) == "optimizer_0/__1_0.distcp: empty file"
    (folder / "optimizer_0" / "__1_0.distcp").write_bytes(b"shard")
    assert checkpoints.checkpoint_problem(folder) is None


def test_damaged_checkpoints_are_set_aside_out_of_the_trainers_sight(whole_checkpoint, tmp_path, caplog):
    from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

    run = tmp_path / "run"
    run.mkdir()
    copy_to(whole_checkpoint, run, 2)
    cut(copy_to(whole_checkpoint, run, 4) / "adapter_model.safetensors")
    (copy_to(whole_checkpoint, run, 6) / "scheduler.pt").unlink()
    (run / checkpoints.PARTIAL_DIR / "checkpoint-8").mkdir(parents=True)  # a save a kill interrupted
    with caplog.at_level(logging.WARNING, logger=checkpoints.log.name):
        assert checkpoints.newest_whole_checkpoint(run) == str(run / "checkpoint-2")
    log = caplog.text
    assert f"checkpoint {run / 'checkpoint-6'} is damaged (no scheduler state" in log
    assert "set aside as damaged-checkpoint-6-1" in log
    assert f"checkpoint {run / 'checkpoint-4'} is damaged (adapter_model.safetensors: unreadable" in log
    assert f"falling back to {run / 'checkpoint-2'}" in log
    assert f"removing {run / checkpoints.PARTIAL_DIR}" in log
    # kept whole for inspection, not deleted; the Trainer's lookup and its rotation no longer see them
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "damaged-checkpoint-4-1",
                                                     "damaged-checkpoint-6-1"]
    assert (run / "damaged-checkpoint-6-1" / "adapter_model.safetensors").is_file()
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    rotate_checkpoints(str(run), save_total_limit=1)
    assert len(list(run.glob("damaged-*"))) == 2

    # the same step damaged again gets its own name; none whole left: a fresh run, said so
    cut(run / "checkpoint-2" / "trainer_state.json")
    copy_to(whole_checkpoint, run, 4)
    cut(run / "checkpoint-4" / "optimizer.pt", 0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=checkpoints.log.name):
        assert checkpoints.newest_whole_checkpoint(run) is None
    assert "no whole checkpoint left: training from scratch" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == ["damaged-checkpoint-2-1", "damaged-checkpoint-4-1",
                                                     "damaged-checkpoint-4-2", "damaged-checkpoint-6-1"]


def test_only_one_process_renames(whole_checkpoint, tmp_path, caplog):
    """Under a launcher every rank looks for the checkpoint; ranks other than 0 skip a damaged one and rename
    nothing, so they cannot race rank 0, and all of them land on the same checkpoint."""
    copy_to(whole_checkpoint, tmp_path, 2)
    cut(copy_to(whole_checkpoint, tmp_path, 4) / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger=checkpoints.log.name):
        assert checkpoints.newest_whole_checkpoint(tmp_path, set_aside_damaged=False) == str(tmp_path / "checkpoint-2")
    assert "is damaged" in caplog.text and "skipped" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_a_checkpoint_set_aside_by_rank_0_mid_check_is_skipped(whole_checkpoint, tmp_path, monkeypatch):
    copy_to(whole_checkpoint, tmp_path, 2)
    cut(copy_to(whole_checkpoint, tmp_path, 4) / "adapter_model.safetensors")
    real = checkpoints.file_problem

    def rank_0_renames_it_meanwhile(path):
        if path.parent.name == "checkpoint-4":
            checkpoints.set_aside(path.parent)
        return real(path)

    monkeypatch.setattr(checkpoints, "file_problem", rank_0_renames_it_meanwhile)
    assert checkpoints.newest_whole_checkpoint(tmp_path, set_aside_damaged=False) == str(tmp_path / "checkpoint-2")


def test_save_failure_names_the_checkpoint_and_the_cause(tmp_path):
    import errno

    final = tmp_path / "checkpoint-4"
    # torch.save reports a full disk as a RuntimeError without an errno: the free space says what happened
    err = checkpoints.save_failure(final, RuntimeError("PytorchStreamWriter failed writing file data/0: file write "
                                                       "failed"))
    assert isinstance(err, RuntimeError)
    assert str(err).startswith(f"cannot save checkpoint {final}: RuntimeError: PytorchStreamWriter failed")
    assert "MiB free on that disk" in str(err) and "previous checkpoints are kept" in str(err)
    err = checkpoints.save_failure(final, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert f"cannot write {final}: No space left on device (" in str(err) and "MiB free on that disk" in str(err)
