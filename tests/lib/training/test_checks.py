"""Checks before any training step: packing needs a model that keeps examples apart; impossible or pretended
set-ups are refused with the reason; the optimizer each device gets."""

from __future__ import annotations

import pytest

from stages.lib.config import ConfigError, TrainParams


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)


def test_packing_check(tiny_model):
    import copy

    import torch

    from stages.lib.training.checks import packing_supported

    assert packing_supported(tiny_model)

    class IgnoresPositions(torch.nn.Module):
        """A model that attends across packed examples (drops position_ids)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    assert not packing_supported(IgnoresPositions(copy.deepcopy(tiny_model)))
    # bf16 rounding (the CUDA training dtype) must not read as a leak, nor hide a real one
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert packing_supported(half)
    assert not packing_supported(IgnoresPositions(half))

def test_optimizer_is_fused_on_cuda_only():
    from stages.lib.model.precision import Precision
    from stages.lib.training.setup import choose_optimizer

    cpu, gpu = Precision("cpu", "float32", "none", ""), Precision("cuda", "bfloat16", "none", "")
    assert choose_optimizer("adamw_torch", cpu) == "adamw_torch"
    assert choose_optimizer("adamw_torch", gpu) == "adamw_torch_fused"
    assert choose_optimizer("paged_adamw_8bit", gpu) == "paged_adamw_8bit"


CPU = ("cpu", "float32", "none", "")
GPU = ("cuda", "bfloat16", "none", "")


@pytest.mark.parametrize("train,precision,env,bf16,message", [
    ({"optimizer": "paged_adamw_8bit"}, CPU, {}, None, "nothing to page, use adamw_torch"),
    ({}, GPU, {}, False, "no bfloat16 support; use float16"),
    ({"distributed": "ddp", "num_processes": 2}, GPU, {"WORLD_SIZE": "4"}, True, "launcher started 4 processes"),
    ({"distributed": "fsdp", "num_processes": 2}, CPU, {"WORLD_SIZE": "2"}, None, "fsdp needs CUDA GPUs"),
    ({"distributed": "fsdp", "num_processes": 2}, ("cuda", "bfloat16", "int8", ""), {}, True,
     "cannot shard 8-bit"),
    ({"distributed": "fsdp", "num_processes": 2, "optimizer": "paged_adamw_8bit"}, GPU, {}, True,
     "fails to save checkpoints under FSDP"),
    ({}, CPU, {"WORLD_SIZE": "2"}, None, "WORLD_SIZE=2 but train.distributed is none"),
])
def test_impossible_setups_are_explained(train, precision, env, bf16, message):
    from stages.lib.model.precision import Precision
    from stages.lib.training.checks import check_training_setup

    with pytest.raises(ConfigError, match=message):
        check_training_setup(TrainParams(report_to="none", **train), Precision(*precision), env, bf16)


def test_more_processes_than_gpus_is_refused():
    from stages.lib.model.precision import Precision
    from stages.lib.training.checks import check_training_setup

    with pytest.raises(ConfigError, match="num_processes=4 but only 2 GPU"):
        check_training_setup(TrainParams(report_to="none", distributed="fsdp", num_processes=4), Precision(*GPU),
                             {}, True, gpu_count=2)


def test_possible_setups_pass():
    from stages.lib.model.precision import Precision
    from stages.lib.training.checks import check_training_setup

    check_training_setup(TrainParams(report_to="none"), Precision(*CPU), {}, None)
    check_training_setup(TrainParams(report_to="none", distributed="ddp", num_processes=2), Precision(*GPU),
                         {"WORLD_SIZE": "2"}, True, gpu_count=2)
    # before the relaunch (no WORLD_SIZE yet) and gloo DDP on CPU are fine too
    check_training_setup(TrainParams(report_to="none", distributed="fsdp", num_processes=2),
                         Precision("cuda", "bfloat16", "nf4", ""), {}, True, gpu_count=2)
    check_training_setup(TrainParams(report_to="none", distributed="ddp", num_processes=2), Precision(*CPU),
                         {"WORLD_SIZE": "2"}, None)


def test_dvclive_missing_is_explained(monkeypatch):
    import importlib.util

    from stages.lib.model.precision import Precision
    from stages.lib.training.checks import check_training_setup

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dvclive" else real(name, *a))
    with pytest.raises(ConfigError, match="dvclive is not installed"):
        check_training_setup(TrainParams(report_to="dvclive"), Precision(*CPU), {}, None)
