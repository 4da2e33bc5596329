"""benchmarks/profile_stage.py and bench_stage.py --profile: the launch command and the profile summary."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_stage  # noqa: E402
import profile_stage  # noqa: E402


@pytest.fixture
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)


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


def test_fsdp_wrap_experiment_goes_through_the_wrapper_without_profiling(tmp_path):
    args = ["--params", "p.yaml"]
    cmd = bench_stage.stage_command(args, {"train": {"distributed": "none", "num_processes": 1}},
                                    str(ROOT / "configs" / "accelerate"), None, tmp_path, fsdp_wrap="layers")
    assert cmd[1:3] == ["-m", "benchmarks.profile_stage"]
    assert cmd[cmd.index("--profile-steps") + 1:cmd.index("--profile-steps") + 3] == ["0", "0"]
    assert cmd[cmd.index("--fsdp-wrap") + 1] == "layers"


def test_gather_limit_experiment_reaches_the_wrapper_and_the_fsdp_plugin(tmp_path, monkeypatch):
    cmd = bench_stage.stage_command(["--params", "p.yaml"], {"train": {"distributed": "none", "num_processes": 1}},
                                    str(ROOT / "configs" / "accelerate"), None, tmp_path, limit_all_gathers=False)
    assert cmd[1:3] == ["-m", "benchmarks.profile_stage"] and "--no-limit-all-gathers" in cmd
    from accelerate.utils import FullyShardedDataParallelPlugin as Plugin

    monkeypatch.setattr(Plugin, "__post_init__", Plugin.__post_init__)
    assert Plugin(fsdp_version=1).limit_all_gathers is True
    profile_stage.no_gather_limit()
    assert Plugin(fsdp_version=1).limit_all_gathers is False


def test_layer_wrap_policy_makes_one_fsdp_unit_per_decoder_layer_lora_included(tiny_model, monkeypatch,
                                                                              free_tcp_port):
    """One process under gloo on the CPU: FSDP1 with use_orig_params wraps each decoder layer (frozen weights and
    LoRA together), and LoRA still gets gradients through it."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_tcp_port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        wrapped = FSDP(model, auto_wrap_policy=profile_stage.layer_wrap_policy(model), use_orig_params=True,
                       device_id=torch.device("cpu"))
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        n_layers = tiny_model.config.num_hidden_layers
        assert len(units) == 1 + n_layers  # the root + one per decoder layer, no unit per LoRA matrix
        ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        frozen = [p for n, p in wrapped.named_parameters() if "lora_" not in n]
        assert all(not p.requires_grad and p.grad is None for p in frozen)
    finally:
        dist.destroy_process_group()


def test_layer_wrap_policy_gives_lora_the_frozen_weights_dtype(tiny_model):
    """A flat parameter holds one dtype: PEFT upcasts LoRA to float32 beside bf16 weights, the policy undoes it."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model.to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    profile_stage.layer_wrap_policy(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_layer_wrap_policy_needs_a_named_layer_class(tiny_model):
    tiny_model._no_split_modules = []
    with pytest.raises(ValueError, match="names no decoder layer class"):
        profile_stage.layer_wrap_policy(tiny_model)


def test_layer_wrap_experiment_config_is_the_stage_config_with_orig_params():
    import yaml

    stage = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    experiment = yaml.safe_load((ROOT / "benchmarks" / "accelerate-fsdp-layers" / "fsdp.yaml").read_text())
    assert experiment["fsdp_config"].pop("fsdp_use_orig_params") is True
    assert stage["fsdp_config"].pop("fsdp_use_orig_params") is False
    assert experiment == stage
