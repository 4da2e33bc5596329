"""Loading models/base (and an adapter) with a resolved precision: safetensors only, never remote code by default."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.model.precision import Precision, build_bnb_config, inference_precision

log = logging.getLogger(__name__)


def count_params_from_config(base_dir: str | Path) -> int:
    """Parameter count of the base model without loading weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {base_dir} (run `dvc repro base_model` first)")
    return AutoTokenizer.from_pretrained(base_dir)


def load_base_model(base_dir: str | Path, precision: Precision, double_quant: bool = True,
                    trust_remote_code: bool = False, local_rank: int = 0, sharded: bool = False):
    """Load models/base with the resolved precision; safetensors only (never unpickles).

    local_rank: the GPU of this process under a launcher (DDP keeps one copy per GPU). sharded: FSDP will place
    and shard the weights itself, so they stay on the host here (rank 0 only, with cpu-RAM-efficient loading).
    """
    import torch
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model in {base_dir} (run `dvc repro base_model` first)")
    kwargs = dict(dtype=getattr(torch, precision.dtype), use_safetensors=True, trust_remote_code=trust_remote_code)
    device = f"cuda:{local_rank}" if precision.device == "cuda" else "cpu"
    bnb = build_bnb_config(precision, double_quant)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        if not sharded:
            kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if bnb is None and not sharded:
        model.to(device)
    return model


def load_model_for_inference(base_dir: str | Path, adapter_dir: str | Path | None, quant,
                             device: str | None = None, merge: bool = False, dtype: str = "auto"):
    """(model, tokenizer, precision) ready for generation: base, or base + LoRA adapter, in eval mode.

    dtype: eval.dtype (see inference_precision).
    merge: fold the adapter into the weights when they are float32 and unquantized. That drops the adapter's extra
    matmuls at every token (on a GPU, PEFT's per-module Python overhead too) and changes logits only at rounding
    level; 16-bit or 4-bit weights would round the update away, so those stay unmerged (and a caller that switches
    the adapter off must not merge).
    """
    tokenizer = load_tokenizer(base_dir)
    precision = inference_precision(quant, count_params_from_config(base_dir), device, dtype)
    log.info("inference precision: %s", precision.as_dict())
    model = load_base_model(base_dir, precision, quant.double_quant)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter in {adapter_dir} (run `dvc repro train` first)")
        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge and precision.quant == "none" and precision.dtype == "float32":
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, precision
