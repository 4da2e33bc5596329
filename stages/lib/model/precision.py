"""Precision and quantization: which device, dtype and weight storage a run uses, decided in one place.

Training (resolve_precision) and generation/scoring (inference_precision) share the rules; build_bnb_config turns
the decision into bitsandbytes' loading config. Measured reasons for the defaults: benchmarks/README.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
    """quant.mode auto: fp32 on CPU (bf16 is far slower there; benchmarks/README.md); on CUDA 4-bit NF4 above
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


def inference_precision(quant, n_params: int, device: str | None = None, dtype: str = "auto") -> Precision:
    """Precision for generation and scoring: as training (resolve_precision), except that on CUDA an unquantized
    model below quant.auto_4bit_min_params runs in float32 under eval.dtype auto.

    Decoding a small model is bound by kernel launches, not arithmetic, so float32 costs no measurable speed there,
    and its greedy answers do not depend on how questions are batched; in bfloat16 the batch shape changes the
    rounding and hence near-tied greedy choices (measured in benchmarks/README.md, "Generation on the GPU"). A dtype
    other than auto is used as given.
    """
    base = resolve_precision(quant, n_params, device)
    if dtype != "auto":
        if base.device == "cpu" and dtype != "float32":
            log.warning("eval.dtype=%s on CPU: 16-bit matmuls are much slower there than float32", dtype)
        return Precision(base.device, dtype, base.quant, f"eval.dtype={dtype}; {base.reason}")
    if base.device == "cuda" and base.quant == "none" and n_params < quant.auto_4bit_min_params:
        return Precision(base.device, "float32", "none",
                         f"auto: {n_params / 1e6:.0f}M params < threshold, generation in float32 on CUDA "
                         "(launch-bound; answers independent of batching)")
    return base


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
