"""train.distributed: the launcher command, and a real 2-process gloo DDP run on CPU against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, adapter_tensors, make_args
from stages.lib.config import ConfigError
from stages.lib.training import checkpoints, launch



def test_cuda_launch_goes_through_accelerate_with_the_committed_config():
    cmd = launch.launch_command("py", "stages.train", ["--params=p.yaml"], "fsdp", 4, "cuda",
                                ROOT / "configs/accelerate")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(ROOT / "configs/accelerate/fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-3:] == ["-m", "stages.train", "--params=p.yaml"]


def test_cpu_launch_uses_torchrun_and_refuses_fsdp():
    cmd = launch.launch_command("py", "stages.train", ["--x=1"], "ddp", 2, "cpu", "unused", port=29555)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "29555" in cmd
    with pytest.raises(ValueError, match="fsdp needs CUDA"):
        launch.launch_command("py", "stages.train", [], "fsdp", 2, "cpu", "unused")


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ddp.yaml not found"):
        launch.launch_command("py", "m", [], "ddp", 2, "cuda", tmp_path)


def test_committed_configs_match_their_mode():
    import yaml

    ddp = yaml.safe_load((ROOT / "configs/accelerate/ddp.yaml").read_text())
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"
    assert fsdp["distributed_type"] == "FSDP"
    # the settings FSDP + QLoRA needs: flat params, rank-0 loading with state sync, no launcher mixed precision
    cfg = fsdp["fsdp_config"]
    assert cfg["fsdp_use_orig_params"] is False and cfg["fsdp_cpu_ram_efficient_loading"] is True
    assert cfg["fsdp_sync_module_states"] is True and fsdp["mixed_precision"] == "no"


def test_under_launcher_needs_both_variables():
    assert launch.under_launcher({"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert not launch.under_launcher({"WORLD_SIZE": "2"})
    assert launch.process_rank({"RANK": "3", "LOCAL_RANK": "1"}) == (3, 1)


@pytest.mark.parametrize("levers", [{"chunked_loss": False}, {"chunked_loss": True}], ids=["trl-loss", "chunked-loss"])
def test_two_gloo_processes_train_the_same_adapter_as_one(workspace, monkeypatch, levers):
    """ddp with 2 CPU processes x batch 2 = 1 process x batch 4: same samples per step, same token-mean loss,
    so the same adapter (dropout off: its masks are drawn per process). The chunked loss runs inside the model's
    forward, so DDP averages its gradients too."""
    import torch

    from stages import train as stage

    monkeypatch.chdir(ROOT)  # the launched processes import `stages` from the working directory
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = {"max_steps": 3, "save_steps": 10, "eval_steps": 3, "learning_rate": 5e-3, **levers}
    lora = {"dropout": 0.0}
    tag = "_chunked" if levers["chunked_loss"] else ""
    one = make_args(workspace, f"ddp_one{tag}", lora=lora, checkpoints=f"ckpt_ddp_one{tag}",
                    train={**common, "per_device_batch_size": 4})
    two = make_args(workspace, f"ddp_two{tag}", lora=lora, checkpoints=f"ckpt_ddp_two{tag}",
                    train={**common, "per_device_batch_size": 2, "distributed": "ddp", "num_processes": 2})
    single = stage.main(one)
    assert stage.main(two) is None  # the parent only launches; rank 0 of the children writes
    multi = json.loads(Path(two.run_report).read_text())
    assert multi["world_size"] == 2 and len(multi["peak_memory_mb_per_process"]) == 2
    assert multi["effective_batch_size"] == single["effective_batch_size"] == 4
    assert multi["global_step"] == single["global_step"] == 3
    a, b = adapter_tensors(one.out), adapter_tensors(two.out)
    assert a.keys() == b.keys()
    assert any((a[k] != 0).any() and "lora_B" in k for k in a)  # it did train
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    # the Trainer's eval loss is a mean of per-batch means, and the eval batches differ (4 vs 2 per process)
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-3)
    assert multi["speedups"]["chunked_loss"] == single["speedups"]["chunked_loss"] == levers["chunked_loss"]
    # the final save: renamed into place by rank 0 only after both processes wrote their part (their RNG states)
    run = Path(two.checkpoints) / multi["run_key"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run / "checkpoint-3").iterdir()}
    assert checkpoints.checkpoint_problem(run / "checkpoint-3") is None


def test_failed_launch_is_an_error_and_writes_nothing(workspace, monkeypatch):
    from stages import train as stage

    monkeypatch.chdir(ROOT)
    args = make_args(workspace, "ddp_bad", checkpoints="ckpt_ddp_bad",
                     train={"distributed": "ddp", "num_processes": 2, "max_steps": 1},
                     lora={"target_modules": ["no_such_proj"]})
    with pytest.raises(ConfigError, match="no_such_proj"):  # the launcher's own process refuses it first ...
        stage.main(args)
    # ... so skip that check here to make the children fail on theirs: a failing child is still an error
    monkeypatch.setattr(stage, "check_target_modules", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="2-process ddp run failed"):
        stage.main(args)
    assert not Path(args.out).exists() and not Path(args.metrics).exists() and not Path(args.run_report).exists()
