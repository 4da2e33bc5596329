"""Precision and quantization for training and inference, and loading for inference (merge only in float32)."""

from __future__ import annotations


from stages.lib.config import QuantParams


def test_resolve_precision_choices():
    from stages.lib.model.precision import resolve_precision

    auto = QuantParams()
    assert resolve_precision(auto, 135_000_000, "cpu").as_dict()["dtype"] == "float32"
    assert resolve_precision(auto, 135_000_000, "cpu").quant == "none"
    assert resolve_precision(auto, 135_000_000, "cuda").quant == "none"
    assert resolve_precision(auto, 135_000_000, "cuda").dtype == "bfloat16"
    assert resolve_precision(auto, 8_000_000_000, "cuda").quant == "nf4"
    assert resolve_precision(QuantParams(mode="nf4"), 1, "cpu").quant == "nf4"


def test_inference_precision_choices(caplog):
    from stages.lib.model.precision import inference_precision

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
    with caplog.at_level("WARNING", logger="stages.lib.model.precision"):
        assert inference_precision(auto, 135_000_000, "cpu", "bfloat16").dtype == "bfloat16"
    assert "slower" in caplog.text


def test_load_for_inference_merges_only_in_float32(tiny_base_dir, tmp_path):
    import torch
    from helpers import write_tiny_adapter

    from stages.lib.model.loading import load_model_for_inference

    tiny_adapter = write_tiny_adapter(tiny_base_dir, tmp_path / "adapter")

    merged, _, p32 = load_model_for_inference(tiny_base_dir, tiny_adapter, QuantParams(), device="cpu", merge=True)
    assert p32.dtype == "float32" and not hasattr(merged, "peft_config")
    half, _, p16 = load_model_for_inference(tiny_base_dir, tiny_adapter, QuantParams(), device="cpu", merge=True,
                                            dtype="bfloat16")
    # 16-bit weights would round the LoRA update away: the adapter stays a separate module
    assert p16.dtype == "bfloat16" and hasattr(half, "peft_config")
    assert next(half.parameters()).dtype == torch.bfloat16
