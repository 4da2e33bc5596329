"""Speed-ups for training: how the work is done, never the work itself, chosen from params.train and the precision.

auto picks what paid on the GPU (benchmarks/README.md, "Levers"). On CPU it keeps SDPA and PEFT's fp32 upcast and
turns on only the chunked loss, which measured faster and leaner there too with the same losses. Float rounding
differs, so switching one changes a run's numbers in the last digits. The techniques themselves:
varlen_attention.py (packed rows without a T x T mask), chunked_loss.py (the loss without full logits), and
disable_lora_input_casting below. setup.py applies them in order.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from stages.lib.config import ConfigError
from stages.lib.training.varlen_attention import varlen_available

log = logging.getLogger(__name__)

# Tokens per chunk of the chunked CE: 1,024 x 128k fp32 logits = 512 MB alive at a time. Changes float rounding only.
LOSS_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class Speedups:
    """The resolved speed-ups for one run (logged and written into the run report, reports/train/run.json)."""
    attention: str            # "sdpa" | "varlen"
    chunked_loss: bool        # chunked_loss.py instead of TRL's fused LM head
    upcast_frozen: bool       # PEFT's kbit preparation (fp32 norms, embeddings, lm_head) for 4/8-bit models
    cast_lora_inputs: bool    # PEFT copies LoRA inputs to the adapter dtype (off: autocast picks bf16)
    reason: str

    def as_dict(self) -> dict:
        return {**asdict(self), "loss_chunk_tokens": LOSS_CHUNK_TOKENS if self.chunked_loss else None}


def resolve_speedups(train, precision, varlen_kernel: bool | None = None) -> Speedups:
    """params.train.attention / chunked_loss / upcast_frozen with auto resolved for this device.

    `varlen_kernel`: whether torch ships the flash varlen kernel (looked up when None).
    """
    cuda = precision.device == "cuda"
    if varlen_kernel is None:
        varlen_kernel = varlen_available()
    why = []
    half = precision.dtype in ("bfloat16", "float16")  # the flash kernel's only dtypes
    if train.attention == "auto":
        attention = "varlen" if cuda and half and train.packing and varlen_kernel else "sdpa"
        why.append(f"attention auto -> {attention}" + ("" if cuda else " (CPU)") +
                   ("" if half else f" ({precision.dtype})") + ("" if train.packing else " (no packing)"))
    else:
        attention = train.attention
        if attention == "varlen" and cuda and not varlen_kernel:
            raise ConfigError("params.yaml [train]: attention: varlen needs torch.nn.attention.varlen, which this "
                              "torch lacks; use attention: auto or sdpa (or a torch >= 2.10)")
        if attention == "varlen" and not (cuda and half):
            log.warning("attention: varlen without CUDA bf16/fp16 runs a per-example SDPA loop (a reference, "
                        "slower than sdpa)")
    if train.chunked_loss == "auto":
        # on for CPU too: against TRL's own fused LM head it measured faster per step and leaner on the 2-core CPU
        # default, same losses (benchmarks/README.md, "CPU default profile")
        chunked = train.distributed != "fsdp"
        why.append(f"chunked_loss auto -> {chunked}" + ("" if cuda else " (CPU)") +
                   (" (fsdp shards lm_head)" if train.distributed == "fsdp" else ""))
    else:
        chunked = train.chunked_loss
    if train.upcast_frozen == "auto":
        upcast = not cuda
        why.append(f"upcast_frozen auto -> {upcast}" + ("" if cuda else " (CPU)"))
    else:
        upcast = train.upcast_frozen
    # Only under autocast (CUDA bf16/fp16) may a LoRA layer see inputs in another dtype than its weights
    cast_inputs = upcast or not cuda or precision.dtype == "float32"
    return Speedups(attention=attention, chunked_loss=chunked, upcast_frozen=upcast, cast_lora_inputs=cast_inputs,
                    reason="; ".join(why) or "all set in params.yaml")


def disable_lora_input_casting(model) -> int:
    """Stop PEFT from copying each LoRA input to the (fp32) adapter dtype; autocast picks the matmul dtype instead.

    Returns the number of LoRA layers changed. Needs `torch.autocast` around forward when adapters are fp32.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n
