"""LoRA: which modules get adapters, PEFT's LoraConfig from params.lora, freezing the base, counting parameters."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def linear_module_names(model) -> list[str]:
    """Sorted leaf names of the linear layers LoRA can adapt (q_proj, up_proj, ...), output head excluded."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for full_name, module in model.named_modules():
        # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style Conv1D is matched by name
        if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(lora, model):
    """lora.target_modules checked against the model: 'all-linear', or the listed names, each of which must exist."""
    from stages.lib.config import ConfigError

    available = linear_module_names(model)
    if lora.target_modules == "all-linear":
        return "all-linear"
    module_names = [name for name, _ in model.named_modules()]
    head = model.get_output_embeddings()
    head_names = {name for name, m in model.named_modules() if m is head}
    missing, on_head = [], []
    for target in lora.target_modules:
        # PEFT matches a target against the end of each module's dotted name
        hits = [n for n in module_names if n == target or n.endswith("." + target)]
        if not hits:
            missing.append(target)
        elif set(hits) <= head_names:
            on_head.append(target)
    if missing:
        raise ConfigError(f"params.yaml [lora]: target_modules {missing} not found in {type(model).__name__}; "
                          f"linear modules available: {available} (or use all-linear)")
    if on_head:
        raise ConfigError(f"params.yaml [lora]: target_modules {on_head} is the output head, which TRL computes "
                          "from its weight directly, so an adapter there would never train; remove it")
    return list(lora.target_modules)


def check_target_modules(lora, base_dir) -> None:
    """resolve_target_modules on the base model built on the meta device (no weights): a wrong module name is
    refused in a second, before the model is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    resolve_target_modules(lora, model)


def build_lora_config(lora, model, trainable_token_ids=()):
    """PEFT LoraConfig from params.lora, with target modules validated against the model.

    `trainable_token_ids` are embedding rows the base_model stage added for model.prompt_format (e.g. <|im_start|>):
    random rows no LoRA update can make meaningful, so PEFT trains those rows themselves (trainable_token_indices:
    len(ids) x hidden parameters, the tied output row included) and nothing else of the embedding."""
    from peft import LoraConfig

    tokens = {"trainable_token_indices": sorted(trainable_token_ids)} if trainable_token_ids else {}
    return LoraConfig(
        **tokens,
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=resolve_target_modules(lora, model),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
    )


def sort_adapter_config(folder: str | Path, config) -> None:
    """Rewrite `folder`/adapter_config.json with the values PEFT keeps as sets (target_modules after all-linear,
    exclude_modules, ...) sorted: PEFT writes them in set order, which follows PYTHONHASHSEED, so the adapter's bytes
    (and its DVC hash) would change from run to run."""
    import json

    path = Path(folder) / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in vars(config).items():
        if isinstance(value, (set, frozenset)) and isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")  # PEFT's own layout


def count_parameters(model, peft_config=None) -> dict:
    """Trainable and total parameter counts (PEFT counts 4-bit packed weights at their real size), and the share of
    the trainable ones that are embedding rows of tokens the prompt format added (`added_token_params`)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    counts = {"trainable": int(trainable), "total": int(total),
              "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}
    rows = getattr(peft_config, "trainable_token_indices", None) or []
    if rows:
        counts["added_token_params"] = len(rows) * model.config.get_text_config().hidden_size
        log.info("trainable embedding rows for the prompt format's added tokens %s: %s params", list(rows),
                 f"{counts['added_token_params']:,}")
    return counts


def freeze_for_lora(model, gradient_checkpointing: bool) -> None:
    """What prepare_model_for_kbit_training does, minus its fp32 upcast of embeddings, lm_head and norms.

    The upcast doubles their memory (2 x 2.1 GB at Llama-3-8B's 128k vocabulary) and makes the lm_head matmul run
    in fp32; LoRA trains the same without it. Non-reentrant checkpointing needs no input-grad hook.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
