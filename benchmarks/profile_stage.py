"""The train stage with torch.profiler on a few steps of every process: where a step's time goes (issue 8).

Takes the train stage's own arguments after its own; under a launcher (accelerate launch / torchrun) every rank
profiles itself. bench_stage.py --profile runs it in place of `stages.train`:

    python -m benchmarks.profile_stage --profile-dir D --profile-steps 3 4 --params ... --tokenized ... (stage args)

Writes, per rank, into the profile folder:
- rank<k>.json: wall seconds per step (on_step_end to on_step_end, so logging and `.item()` syncs are in), the
  profiled steps' device time split into compute kernels and NCCL kernels, CPU time of the hottest ops, and the
  rate of the steps after the profiled ones (tokens/s without the profiler's overhead);
- rank<k>.txt: the profiler's tables (by self device time and by self CPU time).

`--profile-steps 0 0` times the steps without the profiler; `--no-limit-all-gathers` turns off FSDP1's all-gather
rate limiter, which accelerate's config cannot (an experiment, see benchmarks/README.md, issue 8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("profile_stage")


def summarize(events, wall: float, steps: int) -> dict:
    """Device time (kernels, NCCL apart) and the CPU time of the hottest ops from a profiler's key averages."""
    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    # device-side events only: a CPU op's self device time repeats its kernels', and record_function ranges
    # (FSDP's, the Trainer's) show up on the GPU timeline as user annotations spanning many kernels
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not getattr(e, "is_user_annotation", False)]
    nccl = sum(device_us(e) for e in kernels if "nccl" in e.key.lower())
    compute = sum(device_us(e) for e in kernels if "nccl" not in e.key.lower())
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    hooks = [e for e in events if "FullyShardedDataParallel" in e.key or "DistributedDataParallel" in e.key]
    return {
        "profiled_steps": steps,
        "wall_s_per_step": round(wall / steps, 4),
        # kernels on all streams; NCCL runs on its own stream, so compute + nccl can exceed the wall time
        "compute_kernel_s_per_step": round(compute / 1e6 / steps, 4),
        "nccl_kernel_s_per_step": round(nccl / 1e6 / steps, 4),
        "gpu_compute_busy": round(compute / 1e6 / wall, 3) if wall else None,
        "top_cpu_ops": [{"op": e.key[:120], "calls_per_step": round(e.count / steps, 1),
                         "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2)} for e in top_cpu],
        "wrapper_hooks": [{"op": e.key[:120], "calls_per_step": round(e.count / steps, 1),
                           "cpu_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 2)} for e in hooks][:20],
    }


def profiler_callback(folder: Path, first: int, last: int, rank: int):
    """A TrainerCallback profiling optimizer steps first..last (1-based; first = 0: none) and timing every step."""
    import torch
    from transformers import TrainerCallback

    from stages.lib.training.callbacks import WARMUP_STEPS as warmup

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.started, self.marks, self.summary = None, None, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(state.global_step, time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_begin(self, args, state, control, **kwargs):
            if first and state.global_step + 1 == first:
                sync()
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == last:  # (never with first = 0)
                sync()
                wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                self.summary = summarize(events, wall, last - first + 1)
                sort = "self_device_time_total" if cuda else "self_cpu_time_total"
                (folder / f"rank{rank}.txt").write_text(
                    events.table(sort_by=sort, row_limit=45) + "\n\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=45))
                self.prof = None
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

        def on_train_end(self, args, state, control, **kwargs):
            steps = [(s, round(t1 - t0, 4)) for (_, t0, _), (s, t1, _) in zip(self.marks, self.marks[1:])]
            # the steps after the profiled ones; without profiling, the stage's own steady window
            after = [m for m in self.marks if m[0] >= (last + 1 if first else warmup)]
            rate = None
            if len(after) >= 2:
                (_, t0, n0), (_, t1, n1) = after[0], after[-1]
                rate = round((n1 - n0) / (t1 - t0), 1)
            report = {"rank": rank, "step_seconds": steps, "tokens_per_s_after_profile": rate,
                      "steps_after_profile": max(len(after) - 1, 0), "profile": self.summary}
            (folder / f"rank{rank}.json").write_text(json.dumps(report, indent=2))

    return Profile()


def no_gather_limit() -> None:
    """Make every FSDP plugin accelerate builds from here on run FSDP1 without its all-gather rate limiter."""
    from accelerate.utils import FullyShardedDataParallelPlugin as Plugin

    post_init = Plugin.__post_init__

    def patched(self):
        post_init(self)
        self.limit_all_gathers = False

    Plugin.__post_init__ = patched


def main(argv=None) -> None:
    from stages import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile-dir", required=True)
    parser.add_argument("--profile-steps", nargs=2, type=int, default=[3, 4], metavar=("FIRST", "LAST"),
                        help="0 0 = time every step without the profiler")
    parser.add_argument("--limit-all-gathers", action=argparse.BooleanOptionalAction, default=True,
                        help="FSDP1's rate limiter (a CPU sync per all-gather in flight); accelerate always sets it")
    own, rest = parser.parse_known_args(argv)
    first, last = own.profile_steps
    if (first, last) != (0, 0) and not 1 <= first <= last:
        raise SystemExit(f"--profile-steps: need 1 <= FIRST <= LAST (or 0 0), got {first} {last}")
    if not own.limit_all_gathers:
        no_gather_limit()
    folder = Path(own.profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    train.main(train.build_parser().parse_args(rest), callbacks=[profiler_callback(folder, first, last, rank)])


if __name__ == "__main__":
    main()
