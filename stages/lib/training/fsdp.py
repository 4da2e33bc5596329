"""FSDP + LoRA in the train stage: which FSDP units the model is cut into, and the adapter gathered from the shards.

train.fsdp_wrap picks the units:

- `layer`: one FSDP unit per decoder layer, its LoRA matrices inside (plus the root: embeddings, norm, lm_head).
  About 65 FSDP forwards per micro-batch at the Llama-3-8B shape. Frozen and trainable weights share a flat
  parameter, which FSDP1 allows only with use_orig_params, so the stage turns that on; the flat parameter's gradient
  then also covers the frozen weights (one more shard of the model per card).
- `lora`: PEFT's policy, which the Trainer installs by default: every LoRA A and B matrix is its own unit beside the
  frozen layer: many more FSDP forwards per micro-batch, CPU-bound, less memory (scaling measured in
  benchmarks/README.md, "Several GPUs").
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from pathlib import Path

from stages.lib.training.lora import sort_adapter_config

log = logging.getLogger(__name__)

FSDP_PREFIX = "_fsdp_wrapped_module."


def choose_units(fsdp_wrap: str, world_size: int) -> str:
    """The unit layout the stage uses: train.fsdp_wrap, but PEFT's at one process. There FSDP shards nothing
    (NO_SHARD), and torch's FSDP1 with use_orig_params and NO_SHARD breaks on tied weights (embeddings shared with
    lm_head, as in SmolLM2) from the second forward on."""
    return "lora" if fsdp_wrap == "layer" and world_size == 1 else fsdp_wrap


def decoder_layer_classes(model) -> set[type]:
    """The model's decoder layer classes (transformers names them in _no_split_modules); a model without is named."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to wrap; "
                         "set train.fsdp_wrap: lora")
    return layers


def layer_wrap_policy(model):
    """FSDP auto-wrap policy with one unit per decoder layer, LoRA included. A flat parameter holds one dtype, so the
    trainable weights take the frozen weights' dtype (PEFT keeps LoRA in float32 beside bf16 weights otherwise)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layers = decoder_layer_classes(model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    if len(frozen) > 1:
        raise ValueError(f"frozen weights in several dtypes {sorted(map(str, frozen))}: FSDP cannot flatten them "
                         "together with LoRA; load the base model in one dtype")
    if frozen:
        dtype = frozen.pop()
        for p in model.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)


@contextlib.contextmanager
def layer_units():
    """While the Trainer prepares the model: FSDP units per decoder layer instead of PEFT's per LoRA matrix.

    The Trainer installs PEFT's policy right before it wraps the model (transformers.trainer's
    update_fsdp_plugin_peft, which also sets FSDP's mixed precision to the 4-bit storage dtype). That step is kept
    and the layer policy is applied after it."""
    import transformers.trainer as hf_trainer

    original = getattr(hf_trainer, "update_fsdp_plugin_peft", None)
    if original is None:
        raise RuntimeError("transformers.trainer has no update_fsdp_plugin_peft in this version, so the FSDP units "
                           "cannot be chosen; set train.fsdp_wrap: lora")

    def update(model, accelerator):
        original(model, accelerator)
        plugin = accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = layer_wrap_policy(model)
        plugin.use_orig_params = True  # frozen weights and LoRA in one flat parameter
        log.info("FSDP units: one per decoder layer (%s), LoRA inside, use_orig_params",
                 ", ".join(sorted(c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"])))

    hf_trainer.update_fsdp_plugin_peft = update
    try:
        yield
    finally:
        hf_trainer.update_fsdp_plugin_peft = original


def clean_name(name: str) -> str:
    return name.replace(FSDP_PREFIX, "")


def gather_full_params(root, names) -> dict:
    """Full (unsharded) copies of the named parameters, on the CPU of rank 0; {} on the other ranks.

    One FSDP unit at a time, and only the units that hold some of the names (never the whole model at once: that
    is the model's full size on every card); any use_orig_params, any sharding strategy (NO_SHARD at one process
    included). Every rank must call it, after the model's first forward (FSDP's lazy set-up; the stage gathers
    after training).
    names: parameter names of the unwrapped model; a name no unit holds is an error."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    wanted = set(names)
    units = [(clean_name(n), m) for n, m in root.named_modules() if isinstance(m, FSDP)]
    if not units:
        raise ValueError(f"{type(root).__name__} is not wrapped in FSDP")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for prefix, unit in units:
        own = f"{prefix}." if prefix else ""
        nested = [f"{own}{clean_name(n)}." for n, m in unit.named_modules() if isinstance(m, FSDP) and m is not unit]
        held = {w for w in wanted if w.startswith(own) and not any(w.startswith(n) for n in nested)}
        if not held:
            continue  # the same on every rank (names only), so the collectives stay matched
        # FSDP offloads sharded units only (NO_SHARD, e.g. one process, keeps them where they are; copied below)
        offload = unit.sharding_strategy != ShardingStrategy.NO_SHARD
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=offload):
            if not rank0:
                continue
            for name, param in unit.named_parameters():
                full = own + clean_name(name)
                if full in held:
                    out[full] = param.detach().to("cpu", copy=True)
    missing = wanted - set(out)
    if rank0 and missing:
        raise RuntimeError(f"FSDP gather: {len(missing)} parameters not found in any unit, e.g. {sorted(missing)[:3]}")
    return out


def adapter_file_keys(peft_model, adapter: str = "default") -> dict[str, str]:
    """PEFT's key in adapter_model.safetensors for each trainable parameter's name, worked out before FSDP wraps the
    model: once its layers are FSDP units, PEFT no longer recognises its own modules (their names gain FSDP's prefix
    mid-path) and would select nothing from a gathered state dict."""
    import torch
    from peft import get_peft_model_state_dict

    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    probe = {n: torch.tensor(i) for i, n in enumerate(names)}  # values carry the name's index through PEFT's filter
    picked = get_peft_model_state_dict(peft_model, state_dict=probe, adapter_name=adapter, save_embedding_layers=False)
    keys = {names[int(v)]: k for k, v in picked.items()}
    missing = [n for n in names if n not in keys]
    if missing:
        raise ValueError(f"PEFT does not save {len(missing)} trainable parameters, e.g. {missing[:3]}")
    return keys


def save_adapter(peft_model, state: dict, keys: dict[str, str], folder, adapter: str = "default") -> None:
    """Write a gathered adapter as PeftModel.save_pretrained would (adapter_config.json + adapter_model.safetensors);
    `state` maps parameter names to full tensors, `keys` is adapter_file_keys' mapping."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unknown = sorted(set(state) - set(keys))
    if unknown or len(state) != len(keys):
        raise ValueError(f"gathered adapter does not match the model's: {len(state)} tensors for {len(keys)} "
                         f"parameters{', unknown ' + str(unknown[:3]) if unknown else ''}")
    config = copy.deepcopy(peft_model.peft_config[adapter])
    if config.task_type is None:  # PEFT would then add an auto_mapping of the base class, not written here
        raise ValueError("save_adapter writes adapters with a task_type (the stage's LoraConfig: CAUSAL_LM)")
    config.inference_mode = True
    config.save_pretrained(str(folder))
    sort_adapter_config(folder, config)
    save_file({keys[n]: t.contiguous() for n, t in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
