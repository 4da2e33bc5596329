"""Checks that reject a training set-up before any step runs: impossible param combinations, and models that would
not keep packed sequences apart; and what to change when training runs out of memory."""

from __future__ import annotations

from stages.lib.config import name_params_on_oom
from stages.lib.model.precision import Precision


def explain_training_oom(train, effective_batch: int):
    """A context in which running out of memory ends with the params that bound training memory."""
    checkpointing = "" if train.gradient_checkpointing else ", or set train.gradient_checkpointing: true"
    return name_params_on_oom("training", f"lower train.per_device_batch_size (now {train.per_device_batch_size}; "
                              f"raise train.gradient_accumulation_steps to keep the effective batch of "
                              f"{effective_batch}) or tokenize.max_length{checkpointing}")


def check_training_setup(train, precision: Precision, env: dict, bf16_supported: bool | None = None,
                         gpu_count: int | None = None) -> None:
    """Reject combinations that cannot work (or only pretend to), with the reason, before the model is loaded."""
    import importlib.util

    from stages.lib.config import ConfigError

    problems = []
    if train.optimizer.startswith("paged_") and precision.device != "cuda":
        problems.append(f"train.optimizer={train.optimizer} pages optimizer state out of GPU memory; without CUDA "
                        "there is nothing to page, use adamw_torch")
    if precision.device == "cuda" and precision.dtype == "bfloat16" and bf16_supported is False:
        problems.append("quant.compute_dtype=bfloat16 but this GPU has no bfloat16 support; use float16")
    if train.report_to == "dvclive" and importlib.util.find_spec("dvclive") is None:
        problems.append("train.report_to=dvclive but dvclive is not installed; install it or set report_to: none")
    world = int(env.get("WORLD_SIZE") or 1)
    if train.distributed == "none" and world > 1:
        problems.append(f"launched with WORLD_SIZE={world} but train.distributed is none; set ddp (and "
                        f"num_processes: {world}) or run without a launcher")
    if train.distributed != "none" and "WORLD_SIZE" in env and world != train.num_processes:
        problems.append(f"train.num_processes={train.num_processes} but the launcher started {world} processes")
    if train.distributed == "fsdp":
        if precision.device != "cuda":
            problems.append("train.distributed=fsdp needs CUDA GPUs (FSDP + 4-bit weights); use ddp on CPU")
        if precision.quant == "int8":
            problems.append("train.distributed=fsdp cannot shard 8-bit (int8) weights; use quant.mode nf4 or none")
        if train.optimizer.startswith("paged_"):
            problems.append(f"train.optimizer={train.optimizer} fails to save checkpoints under FSDP; use adamw_torch "
                            "(the LoRA optimizer state is small and sharded anyway)")
    if train.distributed != "none" and precision.device == "cuda" and gpu_count is not None \
            and gpu_count < train.num_processes:
        problems.append(f"train.num_processes={train.num_processes} but only {gpu_count} GPU(s) are visible "
                        "(one process per GPU)")
    if problems:
        raise ConfigError("impossible training set-up:\n  - " + "\n  - ".join(problems))


def packing_supported(model, ratio: float = 0.1) -> bool:
    """Whether the model keeps packed sequences apart given only position_ids (padding-free packing relies on it).

    Runs a short random sequence alone, packed after another one (positions restarting at 0), and simply
    concatenated (positions running on, so it attends to the first). Packing is honoured when the packed logits are
    far closer to the alone ones than the leaking ones are: a scale-free test that holds in bf16 and 4-bit, where a
    fixed tolerance would flag rounding.
    """
    import torch

    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (7, 5))
    both = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # no cache: with one, transformers skips packed-sequence detection (generation set-up)
            alone = model(input_ids=second, use_cache=False).logits.float()
            packed = model(input_ids=both, position_ids=positions, use_cache=False).logits[:, 7:].float()
            leaked = model(input_ids=both, use_cache=False).logits[:, 7:].float()
    finally:
        model.train(was_training)
    packed_err = (packed - alone).abs().max()
    leak_err = (leaked - alone).abs().max()
    return bool(packed_err <= ratio * leak_err)


def check_tokenizer(tokenizer, base: str, prompt_format: str) -> None:
    """A pad token distinct from EOS, and every token model.prompt_format writes, before the model is loaded."""
    from stages.lib.model.chat import check_prompt_format

    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{base}: pad token must exist and differ from EOS (rerun base_model)")
    check_prompt_format(tokenizer, prompt_format, f"the tokenizer in {base}")
