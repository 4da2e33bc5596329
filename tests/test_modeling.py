"""modeling helpers: precision choice, LoRA config and target validation, parameter counts, packing check,
impossible set-ups."""

from __future__ import annotations

import pytest

from stages.lib.config import ConfigError, LoraParams, QuantParams, TrainParams


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)


def test_linear_module_names_exclude_the_head(tiny_model):
    from stages.lib.modeling import linear_module_names

    names = linear_module_names(tiny_model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_config_from_params(tiny_model):
    from stages.lib.modeling import build_lora_config

    cfg = build_lora_config(LoraParams(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "self_attn.v_proj"],
                                       use_rslora=True, use_dora=True), tiny_model)
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.1
    assert set(cfg.target_modules) == {"q_proj", "self_attn.v_proj"} and cfg.use_rslora and cfg.use_dora
    assert build_lora_config(LoraParams(), tiny_model).target_modules == "all-linear"


def test_missing_target_modules_are_named_with_the_available_ones(tiny_model):
    from stages.lib.modeling import resolve_target_modules

    with pytest.raises(ConfigError, match=r"\['c_attn', 'wqkv'\] not found in LlamaForCausalLM.*'q_proj'"):
        resolve_target_modules(LoraParams(target_modules=["q_proj", "c_attn", "wqkv"]), tiny_model)


def test_output_head_target_is_refused(tiny_model):
    from stages.lib.modeling import resolve_target_modules

    with pytest.raises(ConfigError, match=r"\['lm_head'\] is the output head"):
        resolve_target_modules(LoraParams(target_modules=["lm_head"]), tiny_model)


def test_trainable_parameter_count(tiny_model):
    import copy

    from peft import get_peft_model

    from stages.lib.modeling import build_lora_config, count_parameters

    model = get_peft_model(copy.deepcopy(tiny_model), build_lora_config(LoraParams(r=2, target_modules=["q_proj"]),
                                                                        tiny_model))
    counts = count_parameters(model)
    # q_proj is 64x64 in each of 2 layers: A (2x64) + B (64x2) per layer
    assert counts["trainable"] == 2 * (2 * 64 + 64 * 2)
    assert counts["total"] == counts["trainable"] + sum(p.numel() for p in tiny_model.parameters())
    assert counts["trainable_percent"] == pytest.approx(100 * counts["trainable"] / counts["total"], abs=1e-3)


def test_packing_check(tiny_model):
    import copy

    import torch

    from stages.lib.modeling import packing_supported

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


def test_resolve_precision_choices():
    from stages.lib.modeling import resolve_precision

    auto = QuantParams()
    assert resolve_precision(auto, 135_000_000, "cpu").as_dict()["dtype"] == "float32"
    assert resolve_precision(auto, 135_000_000, "cpu").quant == "none"
    assert resolve_precision(auto, 135_000_000, "cuda").quant == "none"
    assert resolve_precision(auto, 135_000_000, "cuda").dtype == "bfloat16"
    assert resolve_precision(auto, 8_000_000_000, "cuda").quant == "nf4"
    assert resolve_precision(QuantParams(mode="nf4"), 1, "cpu").quant == "nf4"


def test_inference_precision_choices(caplog):
    from stages.lib.modeling import inference_precision

    auto = QuantParams()
    # CPU: float32 as for training
    assert inference_precision(auto, 135_000_000, "cpu").dtype == "float32"
    # CUDA, small unquantized model: float32 (launch-bound; greedy answers independent of batching)
    small = inference_precision(auto, 135_000_000, "cuda")
    assert (small.dtype, small.quant) == ("float32", "none")
    assert "float32" in small.reason
    # CUDA, large model: the training choice (NF4, bf16 compute); forced unquantized large model: compute dtype
    large = inference_precision(auto, 8_000_000_000, "cuda")
    assert (large.dtype, large.quant) == ("bfloat16", "nf4")
    assert inference_precision(QuantParams(mode="none"), 8_000_000_000, "cuda").dtype == "bfloat16"
    # an explicit eval.dtype is used as given, quantization untouched
    forced = inference_precision(auto, 135_000_000, "cuda", "bfloat16")
    assert (forced.dtype, forced.quant) == ("bfloat16", "none") and "eval.dtype=bfloat16" in forced.reason
    assert inference_precision(auto, 8_000_000_000, "cuda", "float16").quant == "nf4"
    with caplog.at_level("WARNING", logger="stages.lib.modeling"):
        assert inference_precision(auto, 135_000_000, "cpu", "bfloat16").dtype == "bfloat16"
    assert "slower" in caplog.text


def test_load_for_inference_merges_only_in_float32(tiny_base_dir, tmp_path):
    import torch
    from helpers import write_tiny_adapter

    from stages.lib.modeling import load_model_for_inference

    tiny_adapter = write_tiny_adapter(tiny_base_dir, tmp_path / "adapter")

    merged, _, p32 = load_model_for_inference(tiny_base_dir, tiny_adapter, QuantParams(), device="cpu", merge=True)
    assert p32.dtype == "float32" and not hasattr(merged, "peft_config")
    half, _, p16 = load_model_for_inference(tiny_base_dir, tiny_adapter, QuantParams(), device="cpu", merge=True,
                                            dtype="bfloat16")
    # 16-bit weights would round the LoRA update away: the adapter stays a separate module
    assert p16.dtype == "bfloat16" and hasattr(half, "peft_config")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_optimizer_is_fused_on_cuda_only():
    from stages.lib.modeling import Precision, choose_optimizer

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
    from stages.lib.modeling import Precision, check_training_setup

    with pytest.raises(ConfigError, match=message):
        check_training_setup(TrainParams(report_to="none", **train), Precision(*precision), env, bf16)


def test_more_processes_than_gpus_is_refused():
    from stages.lib.modeling import Precision, check_training_setup

    with pytest.raises(ConfigError, match="num_processes=4 but only 2 GPU"):
        check_training_setup(TrainParams(report_to="none", distributed="fsdp", num_processes=4), Precision(*GPU),
                             {}, True, gpu_count=2)


def test_possible_setups_pass():
    from stages.lib.modeling import Precision, check_training_setup

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

    from stages.lib.modeling import Precision, check_training_setup

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dvclive" else real(name, *a))
    with pytest.raises(ConfigError, match="dvclive is not installed"):
        check_training_setup(TrainParams(report_to="dvclive"), Precision(*CPU), {}, None)
