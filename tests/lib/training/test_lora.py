"""LoRA set-up: target modules found and validated, the config from params, trainable-parameter counts."""

from __future__ import annotations

import pytest

from stages.lib.config import ConfigError, LoraParams


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)


def test_linear_module_names_exclude_the_head(tiny_model):
    from stages.lib.training.lora import linear_module_names

    names = linear_module_names(tiny_model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_config_from_params(tiny_model):
    from stages.lib.training.lora import build_lora_config

    cfg = build_lora_config(LoraParams(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "self_attn.v_proj"],
                                       use_rslora=True, use_dora=True), tiny_model)
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.1
    assert set(cfg.target_modules) == {"q_proj", "self_attn.v_proj"} and cfg.use_rslora and cfg.use_dora
    assert build_lora_config(LoraParams(), tiny_model).target_modules == "all-linear"


def test_missing_target_modules_are_named_with_the_available_ones(tiny_model):
    from stages.lib.training.lora import resolve_target_modules

    with pytest.raises(ConfigError, match=r"\['c_attn', 'wqkv'\] not found in LlamaForCausalLM.*'q_proj'"):
        resolve_target_modules(LoraParams(target_modules=["q_proj", "c_attn", "wqkv"]), tiny_model)


def test_output_head_target_is_refused(tiny_model):
    from stages.lib.training.lora import resolve_target_modules

    with pytest.raises(ConfigError, match=r"\['lm_head'\] is the output head"):
        resolve_target_modules(LoraParams(target_modules=["lm_head"]), tiny_model)


def test_trainable_parameter_count(tiny_model):
    import copy

    from peft import get_peft_model

    from stages.lib.training.lora import build_lora_config, count_parameters

    model = get_peft_model(copy.deepcopy(tiny_model), build_lora_config(LoraParams(r=2, target_modules=["q_proj"]),
                                                                        tiny_model))
    counts = count_parameters(model)
    # q_proj is 64x64 in each of 2 layers: A (2x64) + B (64x2) per layer
    assert counts["trainable"] == 2 * (2 * 64 + 64 * 2)
    assert counts["total"] == counts["trainable"] + sum(p.numel() for p in tiny_model.parameters())
    assert counts["trainable_percent"] == pytest.approx(100 * counts["trainable"] / counts["total"], abs=1e-3)
