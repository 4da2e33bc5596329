"""Multi-process launch of the train stage: which launcher, with which arguments, and whether we are under one.

`dvc repro` runs `python -m stages.train ...` as a single process. With train.distributed ddp or fsdp the stage
re-runs itself through a launcher that starts train.num_processes copies (one per GPU):

- CUDA: `accelerate launch --config_file <configs>/<ddp|fsdp>.yaml --num_processes N -m stages.train ...`
  (the committed accelerate configs hold the FSDP + QLoRA settings);
- CPU: `torch.distributed.run --standalone --nproc_per_node N -m stages.train ...` with gloo. accelerate's own
  multi-CPU launch needs mpirun; torchrun does not. Useful to check the launcher path without GPUs.

The caller passes the environment and the paths; only `relaunch` starts a process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK")

log = logging.getLogger(__name__)


def under_launcher(env: Mapping[str, str]) -> bool:
    """True inside a process started by torchrun / accelerate launch (they set WORLD_SIZE and LOCAL_RANK)."""
    return all(key in env for key in LAUNCHER_ENV)


def process_rank(env: Mapping[str, str]) -> tuple[int, int]:
    """(global rank, local rank) of this process; (0, 0) without a launcher."""
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))


def accelerate_config(config_dir: str | Path, distributed: str) -> Path:
    """The committed accelerate config for ddp or fsdp; a missing file is named."""
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"no launcher config for distributed={distributed!r} (ddp or fsdp)")
    path = Path(config_dir) / f"{distributed}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config {path} not found (expected one file per mode in {config_dir})")
    return path


def launch_command(python: str, module: str, argv: Sequence[str], distributed: str, num_processes: int,
                   device: str, config_dir: str | Path, port: int | None = None) -> list[str]:
    """The command that starts `python -m module argv` in num_processes processes for this device."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if device == "cuda":
        cmd = [python, "-m", "accelerate.commands.launch", "--config_file",
               str(accelerate_config(config_dir, distributed)), "--num_processes", str(num_processes)]
        if port is not None:
            cmd += ["--main_process_port", str(port)]
        return [*cmd, "-m", module, *argv]
    if distributed == "fsdp":
        raise ValueError("train.distributed=fsdp needs CUDA GPUs (FSDP + 4-bit weights); use ddp on CPU")
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes)]
    # --standalone picks a free port itself; an explicit port lets two runs share a host predictably
    cmd += ["--master_port", str(port), "--master_addr", "127.0.0.1"] if port is not None else ["--standalone"]
    return [*cmd, "-m", module, *argv]


def relaunch(args, train, device: str, config_dir: str | Path) -> int:
    """Run the train stage again through the launcher with train.num_processes processes; its exit code.

    `dvc repro` starts one plain process; the children see WORLD_SIZE and train. Rank 0 writes the outputs.
    """
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None]
    cmd = launch_command(sys.executable, "stages.train", argv, train.distributed, train.num_processes, device,
                         config_dir)
    log.info("train.distributed=%s: relaunching with %d processes: %s", train.distributed, train.num_processes,
             " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode
