"""benchmarks/profile_stage.py and bench_stage.py --profile: the launch command and the profile summary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import bench_stage, profile_stage

from helpers import ROOT



def event(key, count, self_cpu_us, device_us=0, cpu_total_us=None, device_type="DeviceType.CPU", annotation=False):
    return SimpleNamespace(key=key, count=count, self_cpu_time_total=self_cpu_us, self_device_time_total=device_us,
                           cpu_time_total=cpu_total_us if cpu_total_us is not None else self_cpu_us,
                           device_type=device_type, is_user_annotation=annotation)


def test_summary_splits_nccl_from_compute_and_counts_per_step():
    gpu = "DeviceType.CUDA"
    events = [event("aten::mm", 40, 2_000, device_us=3_000_000),  # CPU op: its kernels are counted once, below
              event("sm90_gemm_bf16", 40, 0, device_us=3_000_000, device_type=gpu),
              event("FullyShardedDataParallel.forward", 2, 0, device_us=4_000_000, device_type=gpu, annotation=True),
              event("ncclDevKernel_AllGather_RING_LL", 20, 500, device_us=1_000_000, device_type=gpu),
              event("FullyShardedDataParallel._pre_forward", 900, 400_000, cpu_total_us=900_000),
              event("cudaLaunchKernel", 4000, 100_000)]
    out = profile_stage.summarize(events, wall=4.0, steps=2)
    assert out["wall_s_per_step"] == 2.0
    assert out["compute_kernel_s_per_step"] == 1.5 and out["nccl_kernel_s_per_step"] == 0.5
    assert out["gpu_compute_busy"] == 0.75
    assert [o["op"] for o in out["top_cpu_ops"]][:2] == ["FullyShardedDataParallel._pre_forward", "cudaLaunchKernel"]
    assert len(out["top_cpu_ops"]) == 6
    assert out["top_cpu_ops"][0]["calls_per_step"] == 450 and out["top_cpu_ops"][0]["self_cpu_ms_per_step"] == 200
    assert [h["op"] for h in out["wrapper_hooks"]] == ["FullyShardedDataParallel.forward",
                                                       "FullyShardedDataParallel._pre_forward"]
    assert out["wrapper_hooks"][1]["cpu_ms_per_step"] == 450


def test_profile_steps_must_be_ordered():
    with pytest.raises(SystemExit, match="FIRST <= LAST"):
        profile_stage.main(["--profile-dir", "/tmp/unused", "--profile-steps", "5", "3"])


def test_stage_command_runs_the_stage_or_the_profiler_through_the_launcher(tmp_path):
    args = ["--params", "p.yaml", "--out", "adapter"]
    params = {"train": {"distributed": "ddp", "num_processes": 2}}
    configs = str(ROOT / "configs" / "accelerate")
    # unprofiled: the stage itself, which relaunches itself as dvc repro would
    assert bench_stage.stage_command(args, params, configs, None, tmp_path)[1:] == ["-m", "stages.train", *args]
    # profiled, one process: the wrapper directly
    one = bench_stage.stage_command(args, {"train": {"distributed": "none", "num_processes": 1}}, configs, [3, 4],
                                    tmp_path)
    assert one[1:5] == ["-m", "benchmarks.profile_stage", "--profile-dir", str(tmp_path)]
    assert one[-len(args):] == args and one[5:8] == ["--profile-steps", "3", "4"]
    # profiled, two processes on this CPU machine: torchrun starts the wrapper
    two = bench_stage.stage_command(args, params, configs, [3, 4], tmp_path)
    assert "torch.distributed.run" in two and two[two.index("--nproc_per_node") + 1] == "2"
    assert two[two.index("-m", 3) + 1] == "benchmarks.profile_stage"


def test_gather_limit_experiment_reaches_the_wrapper_and_the_fsdp_plugin(tmp_path, monkeypatch):
    cmd = bench_stage.stage_command(["--params", "p.yaml"], {"train": {"distributed": "none", "num_processes": 1}},
                                    str(ROOT / "configs" / "accelerate"), None, tmp_path, limit_all_gathers=False)
    assert cmd[1:3] == ["-m", "benchmarks.profile_stage"] and "--no-limit-all-gathers" in cmd
    from accelerate.utils import FullyShardedDataParallelPlugin as Plugin

    monkeypatch.setattr(Plugin, "__post_init__", Plugin.__post_init__)
    assert Plugin(fsdp_version=1).limit_all_gathers is True
    profile_stage.no_gather_limit()
    assert Plugin(fsdp_version=1).limit_all_gathers is False


def test_nvml_sampler_reads_timestamped_samples_and_the_memory_held_before_the_stage(tmp_path):
    from stages.lib.testing.memory import GpuMemorySampler

    csv = tmp_path / "nvml.csv"
    csv.write_text("2026/11/26 04:41:36.770, 0, 32257\n2026/11/26 04:41:36.770, 1, 4\n"
                   "2026/11/26 04:41:36.870, 0, 40961\n2026/11/26 04:41:36.870, 1, 12289\n[N/A], 1, [N/A]\n")
    sampler = GpuMemorySampler(csv)
    assert sampler.start_gib() == {"0": 31.5, "1": 0.0}
    assert sampler.peaks_gib() == {"0": 40.0, "1": 12.0}
    assert sampler.peak_bytes() == 40961 * 2**20
    assert GpuMemorySampler(tmp_path / "none.csv").peaks_gib() == {}
    assert GpuMemorySampler(tmp_path / "none.csv").peak_bytes() is None
