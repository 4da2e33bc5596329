"""The train stage's speed levers (fastpath.py) chosen from params.train and the resolved precision.

auto picks what paid on the GPU (benchmarks/README.md). On CPU it keeps SDPA and PEFT's fp32 upcast and turns on
only the chunked loss, which measured faster and leaner there too with the same losses. The levers change how the
work is done, not the loss; float rounding differs, so switching one changes a run's numbers in the last digits.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

from stages.lib import fastpath
from stages.lib.config import ConfigError

log = logging.getLogger(__name__)

# Tokens per chunk of the chunked CE: 1,024 x 128k fp32 logits = 512 MB alive at a time. Changes float rounding only.
LOSS_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class Speedups:
    """The resolved levers for one run (logged and written into reports/train/metrics.json)."""
    attention: str            # "sdpa" | "varlen"
    chunked_loss: bool        # fastpath's chunked CE instead of TRL's fused LM head
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
        varlen_kernel = fastpath.varlen_available()
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
        # on for CPU too: against TRL's own fused LM head it measured 1.3-1.5x faster per step and 20% less memory
        # on the 2-core CPU default, same losses (benchmarks/README.md)
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


def apply_model_levers(model, speedups: Speedups, train, quantized: bool):
    """The loaded base model with the chosen attention and freezing, and the levers it actually allows:
    (model, speedups). The chunked loss is turned off for a model whose loss it cannot reproduce (an error if
    params.yaml forced it on)."""
    if speedups.attention == "varlen":
        model.set_attn_implementation(fastpath.register_varlen_attention())
    if quantized and speedups.upcast_frozen:
        from peft import prepare_model_for_kbit_training

        # norms/embeddings to float32 and input grads on, so gradients flow through the frozen 4/8-bit layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    elif quantized:
        fastpath.freeze_for_lora(model, train.gradient_checkpointing)
    reason = fastpath.chunked_loss_unsupported(model) if speedups.chunked_loss else None
    if reason is None:
        return model, speedups
    if train.chunked_loss is True:
        raise ConfigError(f"params.yaml [train]: chunked_loss: true, but {reason}; use chunked_loss: auto or false")
    log.info("chunked loss off: %s", reason)
    return model, replace(speedups, chunked_loss=False, reason=f"{speedups.reason}; chunked_loss off: {reason}")


def build_trainer(speedups: Speedups, **trainer_kwargs):
    """TRL's SFTTrainer with the chosen levers applied after it has wrapped the model in PEFT."""
    from trl import SFTTrainer

    if not speedups.chunked_loss:
        trainer = SFTTrainer(**trainer_kwargs)
    else:
        class ChunkedLossSFTTrainer(SFTTrainer):
            """The loss from fastpath's chunked CE, computed inside the model's forward so DDP and PEFT still wrap
            it. TRL's entropy and token-accuracy logs need each token's full softmax, so they are not logged."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if return_outputs:  # the caller wants logits: TRL's path recomputes them
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss = model(**{**inputs, "use_cache": False}, chunked_loss=True,
                             num_items_in_batch=num_items_in_batch).loss
                # As TRL's compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
                return loss

        trainer = ChunkedLossSFTTrainer(**trainer_kwargs)
        model = trainer.model
        fastpath.add_chunked_loss_forward(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                          LOSS_CHUNK_TOKENS)
    if not speedups.cast_lora_inputs:
        fastpath.disable_lora_input_casting(trainer.model)
    return trainer
