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


def inference_precision(quant, n_params: int, device: str | None = None, dtype: str = "auto") -> Precision:
    """Precision for generation and scoring: as training (resolve_precision), except that on CUDA an unquantized
    model below quant.auto_4bit_min_params runs in float32 under eval.dtype auto.

    Decoding a small model is bound by kernel launches, not arithmetic, so float32 costs no measurable speed there,
    and its greedy answers do not depend on how questions are batched; in bfloat16 the batch shape changes the
    rounding and hence near-tied greedy choices (SmolLM2-135M + adapter on an H200: 22 of 64 answers identical
    batched vs one at a time). A dtype other than auto is used as given.
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


# ---------------------------------------------------------------- training set-up (train stage)

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


def build_lora_config(lora, model):
    """PEFT LoraConfig from params.lora, with target modules validated against the model."""
    from peft import LoraConfig

    return LoraConfig(
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


def count_parameters(model) -> dict:
    """Trainable and total parameter counts (PEFT counts 4-bit packed weights at their real size)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total),
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


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


def choose_optimizer(name: str, precision: Precision) -> str:
    """The Trainer `optim` for params.train.optimizer on this device (fused AdamW on CUDA: same maths, faster)."""
    if name == "adamw_torch" and precision.device == "cuda":
        return "adamw_torch_fused"
    return name


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
