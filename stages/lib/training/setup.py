"""The model's set-up for training, as ordered phases, each decided in one place:

1. load       models/base in the resolved precision (model/loading.py; precision decided in model/precision.py)
2. precision  freeze the base for LoRA: FSDP keeps one dtype; 4/8-bit weights get PEFT's kbit preparation (fp32
              norms) when speedups.upcast_frozen, else a plain freeze (lora.freeze_for_lora)
3. speed-ups  varlen attention; the chunked loss only where it reproduces the model's loss (speedups.py)
4. checks     packing needs a model that keeps packed sequences apart
5. LoRA       PEFT's config, target modules validated against the model (lora.py)
6. trainer    SFTConfig from params.train, then TRL's SFTTrainer (its checkpoint saves made whole-or-absent,
              checkpoints.AtomicCheckpointSaves), which wraps the model in PEFT; after that the chunked-loss forward,
              LoRA input casting, adapter dtype

`prepare_model` runs phases 1-5, `build_sft_config` and `build_trainer` phase 6.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from stages.lib.config import ConfigError
from stages.lib.model.loading import load_base_model
from stages.lib.model.precision import Precision
from stages.lib.training import checkpoints, chunked_loss
from stages.lib.training.checks import packing_supported
from stages.lib.training.lora import build_lora_config, freeze_for_lora
from stages.lib.training.speedups import LOSS_CHUNK_TOKENS, Speedups, disable_lora_input_casting
from stages.lib.training.varlen_attention import register_varlen_attention, varlen_unsupported

log = logging.getLogger(__name__)


def freeze_base(model, precision: Precision, train, speedups: Speedups):
    """Phase 2: the loaded model frozen for LoRA in the dtype layout the run trains in."""
    if train.distributed == "fsdp":
        # FSDP1 flattens each unit into one tensor of one dtype: no fp32 upcast of norms/embeddings here
        # (prepare_model_for_kbit_training's), everything stays in the compute dtype, 4-bit storage included.
        # Checkpointing is left to the Trainer, which FSDP needs reentrant (build_sft_config).
        freeze_for_lora(model, gradient_checkpointing=False)
    elif precision.quant != "none" and speedups.upcast_frozen:
        from peft import prepare_model_for_kbit_training

        # norms/embeddings to float32 and input grads on, so gradients flow through the frozen 4/8-bit layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    elif precision.quant != "none":
        freeze_for_lora(model, train.gradient_checkpointing)
    return model


def keep_4bit_weights_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    bitsandbytes 0.50 repacks a Linear4bit's weight the first time it runs in eval mode without grad on an
    AVX512-BF16 CPU (here: the step-0 evaluation) and from then on calls gemv_4bit, which has no autograd: training
    then backpropagates nothing through the frozen layers (LoRA gradients of earlier layers silently wrong), and a
    layer with a bias (Qwen2's q/k/v) fails with an in-place error on a leaf tensor."""
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        log.info("bitsandbytes CPU inference repacking off for %d 4-bit layers (its kernel has no backward)", n)
    return n


def apply_speedups(model, speedups: Speedups, train) -> Speedups:
    """Phase 3: the chosen attention on the model, and the speed-ups it actually allows. Varlen attention falls back
    to SDPA on a model it cannot serve, the chunked loss is turned off for a model whose loss it cannot reproduce
    (each an error if params.yaml forced it on)."""
    reason = varlen_unsupported(model) if speedups.attention == "varlen" else None
    if reason is not None:
        if train.attention == "varlen":
            raise ConfigError(f"params.yaml [train]: attention: varlen, but {reason}; use attention: auto or sdpa")
        log.info("varlen attention off: %s", reason)
        speedups = replace(speedups, attention="sdpa", reason=f"{speedups.reason}; attention sdpa: {reason}")
    if speedups.attention == "varlen":
        model.set_attn_implementation(register_varlen_attention())
    reason = chunked_loss.chunked_loss_unsupported(model) if speedups.chunked_loss else None
    if reason is None:
        return speedups
    if train.chunked_loss is True:
        raise ConfigError(f"params.yaml [train]: chunked_loss: true, but {reason}; use chunked_loss: auto or false")
    log.info("chunked loss off: %s", reason)
    return replace(speedups, chunked_loss=False, reason=f"{speedups.reason}; chunked_loss off: {reason}")


def prepare_model(base: str | Path, precision: Precision, quant, train, lora, speedups: Speedups,
                  local_rank: int = 0, added_tokens: dict | None = None):
    """Phases 1-5: (model, LoRA config, speed-ups the model allows); every error comes before a step runs."""
    model = load_base_model(base, precision, quant.double_quant, local_rank=local_rank,
                            sharded=train.distributed == "fsdp")
    if precision.quant != "none" and precision.device == "cpu":
        keep_4bit_weights_trainable_on_cpu(model)
    model = freeze_base(model, precision, train, speedups)
    speedups = apply_speedups(model, speedups, train)
    if train.packing and not packing_supported(model):
        raise ConfigError(f"params.yaml [train]: packing needs a model that keeps packed sequences apart from "
                          f"position_ids; {type(model).__name__} does not here, set packing: false")
    # tokens base_model added for model.prompt_format ({token: id}): their new rows are trained whole
    return model, build_lora_config(lora, model, tuple((added_tokens or {}).values())), speedups


def choose_optimizer(name: str, precision: Precision) -> str:
    """The Trainer `optim` for params.train.optimizer on this device (fused AdamW on CUDA: same maths, faster)."""
    if name == "adamw_torch" and precision.device == "cuda":
        return "adamw_torch_fused"
    return name


def build_sft_config(train, precision, output_dir: Path, max_length: int, resume: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps > 0 else -1,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=train.weight_decay,
        optim=choose_optimizer(train.optimizer, precision),
        gradient_checkpointing=train.gradient_checkpointing,
        # FSDP1 with flat parameters needs reentrant checkpointing (PEFT's FSDP + QLoRA recipe)
        gradient_checkpointing_kwargs={"use_reentrant": train.distributed == "fsdp"},
        # on CPU this also makes a torchrun launch use gloo instead of looking for GPUs
        use_cpu=precision.device == "cpu",
        # bfd packing turns on padding-free batches (position ids, no cross-example attention)
        packing=train.packing,
        packing_strategy="bfd",
        # sequences are already cut to tokenize.max_length; only packing needs a length (the block size)
        max_length=max_length if train.packing else None,
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy="steps" if train.eval_steps > 0 else "no",
        eval_steps=train.eval_steps or None,
        # step-0 evaluation = the base model (LoRA starts as a no-op): the bar the fine-tune must beat
        eval_on_start=not resume,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        report_to="none",  # dvclive is added as an explicit callback writing to --live
        # CPU trains in float32 (bf16 is far slower there); SFTConfig would default to bf16
        bf16=precision.device == "cuda" and precision.dtype == "bfloat16",
        fp16=precision.device == "cuda" and precision.dtype == "float16",
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False if train.distributed == "ddp" else None,
        dataloader_num_workers=0,
    )


def build_trainer(speedups: Speedups, precision: Precision, **trainer_kwargs):
    """Phase 6: TRL's SFTTrainer (it wraps the model in PEFT), then the speed-ups that need the wrapped model."""
    from trl import SFTTrainer

    trainer_class = chunked_loss.chunked_loss_trainer() if speedups.chunked_loss else SFTTrainer
    trainer = checkpoints.with_atomic_saves(trainer_class)(**trainer_kwargs)
    if speedups.chunked_loss:
        model = trainer.model
        chunked_loss.add_chunked_loss_forward(model.get_base_model() if hasattr(model, "get_base_model") else model,
                                              LOSS_CHUNK_TOKENS)
    if not speedups.cast_lora_inputs:
        disable_lora_input_casting(trainer.model)
    if precision.quant != "none" and precision.dtype == "float32":
        # TRL keeps QLoRA adapters in bf16 (the paper's GPU recipe); on float32 compute that only adds casts
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer
