"""Model loading shared by train, evaluate, ask and export: device, precision and quantization choices."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """The resolved numeric set-up for one run (logged and written into outputs)."""
    device: str          # "cpu" or "cuda"
    dtype: str           # torch dtype name used for compute / non-quantized weights
    quant: str           # "none" | "nf4" | "fp4" | "int8"
    reason: str          # why auto picked it (human-readable)

    def as_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "quant": self.quant, "reason": self.reason}


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(quant, n_params: int, device: str | None = None) -> Precision:
    """quant.mode auto: fp32 on CPU (bf16 is ~25x slower there); on CUDA 4-bit NF4 above
    quant.auto_4bit_min_params, plain bf16 LoRA below (faster for small models)."""
    device = device or detect_device()
    if device == "cpu":
        if quant.mode == "auto":
            return Precision("cpu", "float32", "none", "auto: CPU trains fastest in float32")
        if quant.mode in ("nf4", "fp4", "int8"):
            log.warning("quant.mode=%s on CPU: bitsandbytes' CPU path is very slow (fine for tiny models only)",
                        quant.mode)
        return Precision("cpu", "float32", quant.mode, f"quant.mode={quant.mode} on CPU, compute in float32")
    if quant.mode == "auto":
        if n_params >= quant.auto_4bit_min_params:
            return Precision(device, quant.compute_dtype, "nf4",
                             f"auto: {n_params / 1e9:.2f}B params >= threshold, NF4 4-bit storage")
        return Precision(device, quant.compute_dtype, "none",
                         f"auto: {n_params / 1e6:.0f}M params < threshold, plain {quant.compute_dtype}")
    return Precision(device, quant.compute_dtype, quant.mode, f"quant.mode={quant.mode}")


def count_params_from_config(base_dir: str | Path) -> int:
    """Parameter count of the base model without loading weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_bnb_config(precision: Precision, double_quant: bool):
    """BitsAndBytesConfig for the resolved precision, or None when weights stay unquantized."""
    if precision.quant == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if precision.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision.quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, precision.dtype),
        # FSDP shards the packed 4-bit weights as this dtype; it must match the compute dtype.
        bnb_4bit_quant_storage=getattr(torch, precision.dtype),
    )


def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {base_dir} (run `dvc repro base_model` first)")
    return AutoTokenizer.from_pretrained(base_dir)


def load_base_model(base_dir: str | Path, precision: Precision, double_quant: bool = True,
                    trust_remote_code: bool = False):
    """Load models/base with the resolved precision; safetensors only (never unpickles)."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model in {base_dir} (run `dvc repro base_model` first)")
    kwargs = dict(dtype=getattr(torch, precision.dtype), use_safetensors=True, trust_remote_code=trust_remote_code)
    bnb = build_bnb_config(precision, double_quant)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": 0} if precision.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if bnb is None:
        model.to(precision.device)
    return model


def load_model_for_inference(base_dir: str | Path, adapter_dir: str | Path | None, quant,
                             device: str | None = None):
    """(model, tokenizer, precision) ready for generation: base, or base + LoRA adapter, in eval mode."""
    tokenizer = load_tokenizer(base_dir)
    precision = resolve_precision(quant, count_params_from_config(base_dir), device)
    log.info("inference precision: %s", precision.as_dict())
    model = load_base_model(base_dir, precision, quant.double_quant)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter in {adapter_dir} (run `dvc repro train` first)")
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer, precision
