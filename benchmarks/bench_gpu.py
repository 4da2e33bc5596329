"""Training and generation speed/memory: the reference recipe against the project's, same work, one run.

Reference (reference 003): bitsandbytes NF4 + double quant with bf16 compute, prepare_model_for_kbit_training
(fp32 upcast of norms, embeddings and lm_head, gradient checkpointing), LoRA r=16 alpha=16 on the seven projections,
paged AdamW 8-bit, bf16 autocast (Trainer bf16=True), batches of 2 padded to the longest, transformers' loss;
generation one question at a time.
Project: what stages/lib/training/ (varlen attention, chunked CE, freezing) and evaluation/generation.py give the
train/evaluate stages (train_recipes / gen_recipes below; benchmarks/README.md).

Both do the same work: the same examples (token lengths from benchmarks/lengths.json, random token ids), the same
1024-token cap, the same LoRA config, the same greedy decoding and max_new_tokens. Weights are random (a random-init
model of the real shape has the real FLOPs and memory).

    python3 -m benchmarks.bench_gpu --out $OUT                      # both shapes, train + generate (~6 min, H100)
    python3 -m benchmarks.bench_gpu --shapes smollm2-135m --benches train --out $OUT
    python -m benchmarks.bench_gpu --device cpu --tiny --out /tmp   # the whole code path on CPU in < 1 min
    python -m benchmarks.bench_gpu --device cpu --shapes smollm2-135m --out /tmp      # CPU default profile
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench")

GIB = 1024 ** 3
MAX_LENGTH = 1024
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Real configs (hub config.json of HuggingFaceTB/SmolLM2-135M-Instruct and meta-llama/Meta-Llama-3-8B-Instruct).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000,
                      eos_token_id=128009, pad_token_id=128004),
    # The code path on a CPU in seconds; not a measurement.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


# ------------------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class TrainRecipe:
    quant: str | None          # "nf4" = bitsandbytes 4-bit decoder linears; None = plain `dtype` weights
    dtype: str                 # dtype of every non-quantized weight (and bnb compute dtype)
    kbit_prepare: bool         # peft.prepare_model_for_kbit_training (fp32 upcast + its checkpointing set-up)
    checkpointing: bool        # gradient checkpointing
    batching: str              # "pairs" = batches of `batch_size` padded to the longest; "packed" = token budget
    batch_size: int = 2
    token_budget: int = 0
    attn: str = "sdpa"
    loss: str = "hf"           # "hf" = model(**batch).loss; "chunked" = batches.causal_lm_loss
    optimizer: str = "adamw"   # paged_adamw_8bit | adamw_fused | adamw
    autocast: bool = False     # bf16 autocast around forward/backward
    lora_bf16_inputs: bool = False  # speedups.disable_lora_input_casting
    quant_storage: str = "uint8"
    epochs: int = 1            # passes over the example set that are timed (same work per pass)
    liger: str = ""            # "" | "all" (Liger's defaults: RoPE, RMSNorm, SwiGLU + fused linear CE) | "kernels"


@dataclass(frozen=True)
class GenRecipe:
    quant: str | None
    dtype: str
    merge: bool                # merge LoRA into the (unquantized) weights
    batch_size: int            # 1 = the one-question loop
    quant_storage: str = "uint8"

    def model_key(self):
        return (self.quant, self.dtype, self.merge, self.quant_storage)


def train_recipes(shape: str, device: str, args) -> dict[str, TrainRecipe]:
    if device == "cpu" and not args.tiny:
        # CPU default profile (quant.mode auto -> fp32 on CPU): reference-style batches of 2 vs the default profile's
        # padded batches of train.per_device_batch_size. Packing and the chunked CE are GPU levers: on this CPU they
        # were slower (README), so "packed" only measures them on request.
        ref = TrainRecipe(None, "float32", False, False, "pairs", batch_size=2, optimizer="adamw")
        if args.cpu_project == "packed":
            ours = TrainRecipe(None, "float32", False, False, "packed",
                               token_budget=max(args.budget_cpu, args.max_length), attn="varlen_sdpa",
                               loss="chunked", optimizer="adamw", epochs=args.project_epochs)
        else:
            ours = TrainRecipe(None, "float32", False, False, "pairs", batch_size=args.cpu_batch, optimizer="adamw",
                               epochs=args.project_epochs)
        return {"reference": ref, "project": ours}
    ref = TrainRecipe("nf4", "bfloat16", True, True, "pairs", batch_size=2, optimizer="paged_adamw_8bit",
                      autocast=True)
    big = shape == "llama3-8b"
    ours = TrainRecipe(
        quant="nf4" if big else None,     # quant.mode auto: 4-bit above 1B params, plain bf16 below
        dtype="bfloat16", kbit_prepare=False, checkpointing=big, batching="packed",
        token_budget=max(args.budget_8b if big else (args.budget_135m if shape != "tiny" else 512), args.max_length),
        attn="varlen_sdpa", loss="chunked", optimizer="adamw_fused" if device == "cuda" else "adamw",
        autocast=True, lora_bf16_inputs=True, quant_storage="bfloat16", epochs=args.project_epochs)
    recipes = {"reference": ref}
    if args.ref_checkpointing in ("off", "both"):
        # The anchors (1,477 tok/s at 32.8 GiB for 8B) match this variant, not the checkpointed one.
        recipes["reference-no-ckpt"] = dataclasses.replace(ref, checkpointing=False)
    if args.ref_checkpointing == "off":
        del recipes["reference"]
    recipes["project"] = ours
    # Liger Kernel, the peer users reach for through axolotl / LLaMA-Factory (`liger_kernel: true`): its documented
    # defaults (apply_liger_kernel_to_llama(): RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy in place of
    # the model's loss) on the reference recipe; on our recipe with Liger's fused CE in place of our chunked CE
    # (our memory level: same packing budget); and our recipe plus Liger's three layer kernels, keeping our CE.
    recipes["liger"] = dataclasses.replace(ref, liger="all")
    recipes["liger-no-ckpt"] = dataclasses.replace(ref, checkpointing=False, liger="all")
    recipes["liger-packed"] = dataclasses.replace(ours, loss="hf", liger="all")
    recipes["project-liger"] = dataclasses.replace(ours, liger="kernels")
    # Our recipe at a peer's memory level: train.gradient_checkpointing: true (already on at 8B), with --budget-135m
    # lowered to the smallest packing budget (max_length) when comparing with the peers' 0.5 GiB rows at 135M.
    recipes["project-ckpt"] = dataclasses.replace(ours, checkpointing=True)
    return recipes


LIGER_PATCHED = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")


def apply_liger(model, which: str) -> None:
    """Liger's kernels on an already-built Llama (its model= path patches the instance's modules).

    It also rebinds module-level names of modeling_llama (RoPE, the RMSNorm and MLP classes) for good: run_train
    restores them after the row (restore_llama_module) so rows that follow measure plain transformers again.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=which == "all", model=model)


@contextlib.contextmanager
def restore_llama_module():
    from transformers.models.llama import modeling_llama

    kept = {name: getattr(modeling_llama, name) for name in LIGER_PATCHED}
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(modeling_llama, name, value)


def gen_recipes(shape: str, device: str, args) -> dict[str, GenRecipe]:
    if device == "cpu" and not args.tiny:
        return {"reference": GenRecipe(None, "float32", False, 1),
                "project": GenRecipe(None, "float32", True, args.gen_batch)}
    ref = GenRecipe("nf4", "bfloat16", False, 1)
    if shape == "llama3-8b":
        # Same NF4 model as the reference (quant.mode auto), batched: answers comparable token for token.
        ours = GenRecipe("nf4", "bfloat16", False, args.gen_batch_8b)
    else:
        ours = GenRecipe(None, "bfloat16", True, args.gen_batch)
    return {"reference": ref, "project": ours}


# -------------------------------------------------------------------------------------------------- the work


def load_lengths(path: Path, seed: int) -> tuple[list[tuple[int, int]], str]:
    """(prompt_len, answer_len) pairs of the tokenized train split; synthetic until make_lengths.py has run."""
    if path.is_file():
        data = json.loads(path.read_text())
        pairs = [tuple(p) for p in data["pairs"]]
        return pairs, f"{path.name} ({data.get('tokenizer', '?')}, {len(pairs)} examples)"
    log.warning("%s not found: using SYNTHETIC lengths (median ~216, mean ~283); run python -m tools.make_lengths",
                path)
    rng = random.Random(seed)
    pairs = []
    for _ in range(4000):
        prompt = min(int(rng.lognormvariate(math.log(48), 0.35)), 300)
        answer = max(4, int(rng.lognormvariate(math.log(160), 0.85)))
        pairs.append((prompt, min(answer, MAX_LENGTH - prompt)))
    return pairs, "synthetic"


def pick_examples(pairs, n: int, seed: int, cap: int) -> list[tuple[int, int]]:
    """n pairs drawn with a fixed seed, always including the longest (its memory peak must be in the run)."""
    capped = [(min(p, cap - 1), min(a, cap - min(p, cap - 1))) for p, a in pairs]
    longest = max(range(len(capped)), key=lambda i: sum(capped[i]))
    rng = random.Random(seed)
    rest = [i for i in range(len(capped)) if i != longest]
    chosen = [longest] + rng.sample(rest, min(n - 1, len(rest)))
    rng.shuffle(chosen)
    return [capped[i] for i in chosen]


def make_train_examples(pairs, vocab: int, eos: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for p, a in pairs:
        ids = [rng.randrange(3, vocab) for _ in range(p + a)]
        ids[-1] = eos
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def make_prompts(pairs, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(3, vocab) for _ in range(p)] for p, _ in pairs]


# ----------------------------------------------------------------------------------------------------- models


def build_model(shape: str, device: str, dtype: str, quant: str | None, quant_storage: str, attn: str,
                seed: int, init_std: float):
    """Random-init model of the real shape, built directly on `device` (testing.models.random_llama's meta path).

    For NF4 every decoder linear becomes a bitsandbytes Linear4bit quantized on the device from its random bf16
    weight (what from_pretrained(quantization_config=...) does tensor by tensor). The bf16 model exists briefly
    (16 GB at 8B); runs reset the peak counters after the build.
    """
    import torch
    from transformers import LlamaConfig

    from stages.lib.testing.models import random_llama

    torch_dtype = getattr(torch, dtype)
    config = LlamaConfig(**SHAPES[shape], attn_implementation=attn)
    config.use_cache = False
    model = random_llama(config, seed, device, torch_dtype, init_std)
    if quant == "nf4":
        quantize_decoder_(model, torch_dtype, getattr(torch, quant_storage), device)
    elif quant is not None:
        raise ValueError(f"unsupported quant {quant!r}")
    return model


def quantize_decoder_(model, compute_dtype, quant_storage, device) -> None:
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=quant_storage, device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=quant_storage, module=q).to(device)
            setattr(parent, child, q)
            del module
    model.is_loaded_in_4bit = True  # what peft looks at to pick its bnb LoRA layers
    model.quantization_method = "bitsandbytes"


def add_lora(model, seed: int, random_b: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    if random_b:  # a trained adapter is not zero; makes merged vs unmerged generation a real comparison
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01, generator=gen)
    return model


def release_memory() -> None:
    """Return freed blocks to the card between runs (callers drop their references first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- memory


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_monitor(device: str, interval_s: float):
    """The card's own used-memory counter (testing.memory) on this process's GPU; nothing on CPU."""
    import torch

    from stages.lib.testing.memory import GpuMemorySampler

    if device != "cuda" or interval_s <= 0:
        return contextlib.nullcontext()
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    gpu = (torch.cuda.current_device() if uuid is None
           else str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}")
    return GpuMemorySampler(gpus=[gpu], interval_s=interval_s)


def memory_fields(device, monitor) -> dict:
    import torch

    if device != "cuda":
        return {"peak_gib": None, "nvml_peak_gib": None}
    peak = monitor.peak_bytes() if monitor is not None else None
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "reserved_peak_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "nvml_peak_gib": round(peak / GIB, 3) if peak is not None else None,
            "nvml_source": monitor.source if monitor is not None else None}


# ---------------------------------------------------------------------------------------------------- training


def prepare_train_model(shape, recipe: TrainRecipe, device, args):
    import torch
    from stages.lib.training import lora, speedups

    model = build_model(shape, device, recipe.dtype, recipe.quant, recipe.quant_storage, recipe.attn, args.seed,
                        args.init_std)
    if recipe.liger:
        apply_liger(model, recipe.liger)
    if recipe.kbit_prepare:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.checkpointing)
    else:
        lora.freeze_for_lora(model, recipe.checkpointing)
    model = add_lora(model, args.seed, random_b=False)
    if recipe.lora_bf16_inputs:
        speedups.disable_lora_input_casting(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)
    elif recipe.optimizer == "adamw_fused":
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    return model, opt, params


def plan_train_batches(examples, recipe: TrainRecipe, pad_id: int, seed: int) -> list[dict]:
    from stages.lib.testing import batches

    rng = random.Random(seed)
    if recipe.batching == "pairs":
        order = list(range(len(examples)))
        rng.shuffle(order)  # the Trainer's random sampler: neighbours of any length share a padded batch
        groups = [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        return [batches.collate_padded([examples[i] for i in g], pad_id) for g in groups]
    bins = batches.plan_packed_batches([len(e["input_ids"]) for e in examples], recipe.token_budget)
    rng.shuffle(bins)
    return [batches.collate_packed([examples[i] for i in b]) for b in bins]


def batch_tokens(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def optimizer_step(loss, params, opt):
    """Backward, clip to norm 1 (as the Trainer does), step, clear; returns the detached loss."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed_steps(step, batches, device, warmup_steps: int, poll_ms: float, epochs: int = 1):
    """Warm up on the batch holding the most tokens (the memory peak, allocator and kernel selection), then time
    `epochs` passes of `step` over `batches`; returns (losses, seconds, memory monitor)."""
    heaviest = max(batches, key=lambda b: b["input_ids"].numel())
    with memory_monitor(device, poll_ms / 1000) as monitor:
        for _ in range(warmup_steps):
            step(heaviest)
        sync(device)
        losses = []
        t0 = time.perf_counter()
        for _ in range(epochs):
            for batch in batches:
                losses.append(step(batch))
        sync(device)
        seconds = time.perf_counter() - t0
    return losses, seconds, monitor


def run_train(shape, name, recipe: TrainRecipe, examples, pad_id, device, args) -> dict:
    import torch
    from stages.lib.testing.batches import causal_lm_loss

    t_build = time.perf_counter()
    model, opt, params = prepare_train_model(shape, recipe, device, args)
    build_s = time.perf_counter() - t_build
    reset_peak(device)  # after the build: its transient bf16 copy of a 4-bit model is not training memory
    batches = plan_train_batches(examples, recipe, pad_id, args.seed)
    amp = (torch.autocast(device_type=device, dtype=torch.bfloat16) if recipe.autocast
           else contextlib.nullcontext())

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with amp:
            if recipe.loss == "chunked":
                loss = causal_lm_loss(model, batch, chunk_size=args.ce_chunk)
            else:
                loss = model(**batch, use_cache=False).loss
        return optimizer_step(loss, params, opt)

    losses, seconds, monitor = timed_steps(step, batches, device, args.warmup_steps, args.poll_ms, recipe.epochs)
    tokens = sum(batch_tokens(b) for b in batches) * recipe.epochs
    padded = sum(int(b["input_ids"].numel()) for b in batches) * recipe.epochs
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    if not all(math.isfinite(x) for x in loss_values):
        raise RuntimeError(f"{shape}/{name}: non-finite training loss")
    row = {
        "bench": "train", "shape": shape, "recipe": name,
        "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2), "tokens": tokens,
        "examples": len(examples), "epochs": recipe.epochs, "steps": len(batches) * recipe.epochs,
        "pad_fraction": round(1 - tokens / padded, 4), "first_loss": round(loss_values[0], 4),
        # the last pass's mean loss: rows that batch alike (pairs vs pairs, packed vs packed) took the same steps
        "last_pass_mean_loss": round(sum(loss_values[-len(batches):]) / len(batches), 4),
        **memory_fields(device, monitor), "build_s": round(build_s, 1),
        "settings": dataclasses.asdict(recipe),
    }
    # step() closes over these three: rebinding frees the model as `del` would, and a `del` reads as undefined to ruff
    model = opt = params = None
    del batches
    release_memory()
    return row


# -------------------------------------------------------------------------------------------------- generation


def prepare_gen_model(shape, recipe: GenRecipe, device, args):
    model = build_model(shape, device, recipe.dtype, recipe.quant, recipe.quant_storage, "sdpa", args.seed,
                        args.init_std)
    model.config.use_cache = True
    model = add_lora(model, args.seed, random_b=True)
    if recipe.merge:
        model = model.merge_and_unload()
    model.eval()
    return model


def run_generate(shape, name, recipe: GenRecipe, model, prompts, stop_ids, pad_id, device, args):
    from stages.lib.evaluation.generation import generate_batched, length_sorted_batches

    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                      repetition_penalty=args.repetition_penalty, eos_token_id=sorted(stop_ids))
    if args.gen_cache == "static" and recipe.batch_size > 1:
        gen_kwargs["cache_implementation"] = "static"
    reset_peak(device)
    with memory_monitor(device, args.poll_ms / 1000) as monitor:
        warm = dict(gen_kwargs, max_new_tokens=4)
        first = length_sorted_batches([len(p) for p in prompts], recipe.batch_size)[0]
        generate_batched(model, [prompts[i] for i in first], recipe.batch_size, pad_id, stop_ids, **warm)
        sync(device)
        t0 = time.perf_counter()
        if recipe.batch_size == 1:
            answers = [generate_batched(model, [p], 1, pad_id, stop_ids, **gen_kwargs)[0] for p in prompts]
        else:
            answers = generate_batched(model, prompts, recipe.batch_size, pad_id, stop_ids, **gen_kwargs)
        sync(device)
        seconds = time.perf_counter() - t0
    new_tokens = sum(len(a) for a in answers)
    row = {
        "bench": "generate", "shape": shape, "recipe": name,
        "tokens_per_s": round(new_tokens / seconds, 1), "seconds": round(seconds, 2), "new_tokens": new_tokens,
        "questions": len(prompts), "batch_size": recipe.batch_size, "max_new_tokens": args.max_new_tokens,
        "stopped_at_eos": sum(1 for a in answers if a and a[-1] in stop_ids),
        **memory_fields(device, monitor), "settings": dataclasses.asdict(recipe),
    }
    return row, answers


def match_rates(a: list[list[int]], b: list[list[int]]) -> dict:
    exact = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(n / max(len(x), len(y), 1))
    first = sum(bool(x) and bool(y) and x[0] == y[0] for x, y in zip(a, b))
    return {"exact_match": round(exact / max(len(a), 1), 4), "compared": len(a),
            "first_token_match": round(first / max(len(a), 1), 4),
            "mean_common_prefix": round(sum(prefix) / max(len(prefix), 1), 4)}


def loop_subset(prompts, k: int) -> list[int]:
    """k question indices spread evenly over the prompt lengths (longest included): the loop runs on these."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if k >= len(order):
        return order
    return [order[round(j * (len(order) - 1) / (k - 1))] for j in range(k)] if k > 1 else order[:1]


def bench_generate(shape, device, args, gen_pairs) -> list[dict]:
    cfg = SHAPES[shape]
    if shape == "llama3-8b":
        gen_pairs = gen_pairs[:args.gen_questions_8b]
    prompts = make_prompts(gen_pairs, cfg["vocab_size"], args.seed)
    stop_ids = {cfg["eos_token_id"]}
    pad_id = cfg["pad_token_id"]
    recipes = gen_recipes(shape, device, args)
    subset = loop_subset(prompts, args.loop_questions)
    sub_prompts = [prompts[i] for i in subset]
    rows = []

    ref = recipes["reference"]
    model = prepare_gen_model(shape, ref, device, args)
    ref_row, ref_answers = run_generate(shape, "reference", ref, model, sub_prompts, stop_ids, pad_id, device, args)
    ref_row["note"] = f"one-question loop on {len(subset)} of the {len(prompts)} questions (spread over lengths)"
    rows.append(ref_row)
    log.info("%s generate reference: %.1f new tok/s", shape, ref_row["tokens_per_s"])

    ours = recipes["project"]
    same_model = ours.model_key() == ref.model_key()
    if not same_model:
        del model
        release_memory()
        model = prepare_gen_model(shape, ours, device, args)
    row, answers = run_generate(shape, "project", ours, model, prompts, stop_ids, pad_id, device, args)
    mine = [answers[i] for i in subset]
    if same_model:
        loop_answers = ref_answers
        row["match_baseline"] = "reference loop (identical weights)"
    else:
        loop_row, loop_answers = run_generate(shape, "project-loop", dataclasses.replace(ours, batch_size=1), model,
                                              sub_prompts, stop_ids, pad_id, device, args)
        row["loop_tokens_per_s"] = loop_row["tokens_per_s"]
        row["match_baseline"] = "project model, one-question loop"
        row["exact_match_vs_reference"] = match_rates(mine, ref_answers)["exact_match"]
    row.update(match_rates(mine, loop_answers))
    rows.append(row)
    log.info("%s generate project: %.1f new tok/s, exact match %.2f", shape, row["tokens_per_s"],
             row["exact_match"])
    del model
    release_memory()
    return rows


def bench_train(shape, device, args, train_pairs) -> list[dict]:
    cfg = SHAPES[shape]
    examples = make_train_examples(train_pairs, cfg["vocab_size"], cfg["eos_token_id"], args.seed)
    rows = []
    for name, recipe in train_recipes(shape, device, args).items():
        if name not in args.recipes:
            continue
        with restore_llama_module():
            row = run_train(shape, name, recipe, examples, cfg["pad_token_id"], device, args)
        log.info("%s train %s: %.0f tok/s, peak %s GiB (nvml %s)", shape, name, row["tokens_per_s"],
                 row["peak_gib"], row["nvml_peak_gib"])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- self-check


def self_check(device: str, seed: int) -> dict:
    """On this device and dtype: packed rows through the varlen kernel give each example its own loss.

    A small Llama in bf16 (fp32 on CPU): loss of one packed row (varlen attention + chunked CE) against the
    token-weighted mean of per-example losses (plain SDPA, one example at a time), and the gradient of one weight
    against the packed row through SDPA's dense block-diagonal mask.
    """
    import torch
    from transformers import LlamaConfig

    from stages.lib.testing import batches
    from stages.lib.testing.models import random_llama
    from stages.lib.training import varlen_attention
    from stages.lib.evaluation.generation import generate_batched

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         attn_implementation="sdpa", use_cache=False)
    model = random_llama(config, seed).to(device=device, dtype=dtype)
    examples = make_train_examples([(20, 60), (5, 200), (64, 64), (1, 30)], 1000, 2, seed)
    packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches.collate_packed(examples).items()}
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]], device=device)).logits[0, :-1].float()
            y = torch.tensor(ex["labels"][1:], device=device)
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum", ignore_index=-100))
            count += int((y != -100).sum())
    grads = {}
    losses = {}
    for attn in ("sdpa", varlen_attention.VARLEN_ATTENTION):
        model.set_attn_implementation(attn)
        model.zero_grad()
        loss = batches.causal_lm_loss(model, packed, chunk_size=64)
        loss.backward()
        losses[attn] = float(loss.detach())
        grads[attn] = model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
    alone = total / count
    grad_rel = float((grads["sdpa"] - grads[varlen_attention.VARLEN_ATTENTION]).norm() / grads["sdpa"].norm())
    out = {
        "dtype": str(dtype).replace("torch.", ""),
        "varlen_kernel": device == "cuda" and varlen_attention.varlen_available(),
        "loss_alone": round(alone, 5), "loss_packed_varlen": round(losses[varlen_attention.VARLEN_ATTENTION], 5),
        "loss_packed_sdpa_mask": round(losses["sdpa"], 5), "grad_rel_diff_varlen_vs_sdpa": round(grad_rel, 5),
    }
    # Batched, left-padded, length-sorted greedy generation against the one-question loop. In fp32 it must agree
    # token for token (this checks the batching); in bf16 random weights make near-ties common, so rounding flips
    # some argmaxes and the paths part (see README).
    model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    model.eval()
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (7, 40, 3, 25, 60, 12)]
    gen = dict(max_new_tokens=24, do_sample=False, num_beams=1, use_cache=True, repetition_penalty=1.1,
               eos_token_id=[2])
    for name, gen_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model.to(gen_dtype)
        loop = [generate_batched(model, [p], 1, 0, {2}, **gen)[0] for p in prompts]
        batched = generate_batched(model, prompts, len(prompts), 0, {2}, **gen)
        out[f"generate_exact_match_{name}"] = match_rates(batched, loop)["exact_match"]
    tol = 0.02 if dtype == torch.bfloat16 else 1e-4
    out["ok"] = (abs(losses[varlen_attention.VARLEN_ATTENTION] - alone) < tol * max(1.0, alone)
                 and abs(losses["sdpa"] - alone) < tol * max(1.0, alone) and grad_rel < (0.05 if tol > 1e-3 else 1e-3)
                 and out["generate_exact_match_fp32"] == 1.0)
    (log.info if out["ok"] else log.error)("self-check: %s", out)
    return out


# ------------------------------------------------------------------------------------------------------ report


TARGETS = {("train", "llama3-8b"): (3.0, 1 / 3), ("train", "smollm2-135m"): (20.0, None),
           ("generate", "llama3-8b"): (20.0, None), ("generate", "smollm2-135m"): (20.0, None)}


def compute_ratios(rows, targets: bool = True) -> dict:
    """project / reference per (bench, shape); targets (issue 6, one GPU) are judged only when `targets`."""
    out = {}
    for (bench, shape) in sorted({(r["bench"], r["shape"]) for r in rows}):
        by = {r["recipe"]: r for r in rows if r["bench"] == bench and r["shape"] == shape}
        if "project" not in by:
            continue
        ours = by["project"]
        refs = [by[n] for n in ("reference", "reference-no-ckpt") if n in by]
        entry = compare(bench, shape, refs[0], ours, targets) if refs else {}
        if "reference-no-ckpt" in by and "reference" in by:
            entry["vs_reference_no_ckpt"] = compare(bench, shape, by["reference-no-ckpt"], ours, targets)
        for peer in sorted(n for n in by if n.startswith(("liger", "unsloth"))):  # peers
            vs = compare(bench, shape, by[peer], ours, targets=False)
            vs["ahead_at_no_more_memory"] = vs["speedup"] > 1 and vs.get("peak_ratio", 1) <= 1
            entry[f"vs_{peer}"] = vs
        if entry:
            out[f"{bench}/{shape}"] = entry
    return out


def compare(bench, shape, ref, ours, targets: bool = True) -> dict:
    entry = {"speedup": round(ours["tokens_per_s"] / ref["tokens_per_s"], 2)}
    if ref.get("peak_gib"):
        entry["peak_ratio"] = round(ours["peak_gib"] / ref["peak_gib"], 3)
    if ref.get("nvml_peak_gib") and ours.get("nvml_peak_gib"):
        entry["nvml_peak_ratio"] = round(ours["nvml_peak_gib"] / ref["nvml_peak_gib"], 3)
    speed_t, mem_t = TARGETS.get((bench, shape), (None, None)) if targets else (None, None)
    if speed_t is not None and (mem_t is None or "peak_ratio" in entry):
        ok = entry["speedup"] >= speed_t
        if mem_t is not None:
            ok = ok and entry["peak_ratio"] <= mem_t
        entry["meets_speed_memory"] = ok
        if bench == "generate":
            entry["exact_match"] = ours.get("exact_match")
            ok = ok and ours.get("exact_match", 0) >= 0.95
        entry["target"] = f">= {speed_t:g}x" + (f" and <= {mem_t:.3g} of peak" if mem_t else "") + (
            " and exact match >= 0.95" if bench == "generate" else "")
        entry["meets_target"] = ok
    return entry


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "triton",
                 "liger_kernel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


def device_info(device) -> dict:
    import platform

    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"name": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / GIB, 1),
                "cuda": torch.version.cuda, "sm_count": props.multi_processor_count}
    return {"name": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}


def card_slug(name: str) -> str:
    name = re.sub(r"^nvidia\s+", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "device"


def output_path(out: str, date: str, card: str) -> Path:
    p = Path(out)
    return p if p.suffix == ".json" else p / f"{date}-{card}.json"


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random model: checks the code path, measures nothing")
    ap.add_argument("--shapes", nargs="+", choices=["smollm2-135m", "llama3-8b"],
                    default=["smollm2-135m", "llama3-8b"])
    ap.add_argument("--benches", nargs="+", choices=["train", "generate"], default=["train", "generate"])
    ap.add_argument("--recipes", nargs="+", choices=["reference", "reference-no-ckpt", "project", "liger",
                                                     "liger-no-ckpt", "liger-packed", "project-liger",
                                                     "project-ckpt"],
                    default=["reference", "reference-no-ckpt", "project"],
                    help="training recipes to run (generation always runs both: its match needs the loop)")
    ap.add_argument("--lengths", default=str(ROOT / "benchmarks" / "lengths.json"))
    ap.add_argument("--train-examples", type=int, default=None, help="examples per training run (incl. longest)")
    ap.add_argument("--project-epochs", type=int, default=None,
                    help="timed passes of the project recipe over the examples (reference: 1)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--budget-135m", type=int, default=16384, help="packed tokens per step, SmolLM2-135M")
    ap.add_argument("--budget-8b", type=int, default=4096, help="packed tokens per step, Llama-3-8B")
    ap.add_argument("--budget-cpu", type=int, default=1024,
                    help="packed tokens per step, CPU profile (--cpu-project packed)")
    ap.add_argument("--cpu-project", choices=["default", "packed"], default="default",
                    help="CPU profile's project recipe: default = padded batches of --cpu-batch; packed = packing "
                         "+ varlen + chunked CE")
    ap.add_argument("--cpu-batch", type=int, default=4, help="as params.yaml train.per_device_batch_size")
    ap.add_argument("--ce-chunk", type=int, default=1024, help="tokens per chunk of the chunked cross-entropy")
    ap.add_argument("--gen-questions", type=int, default=None, help="questions generated by the project recipe")
    ap.add_argument("--loop-questions", type=int, default=None,
                    help="questions of the one-question loop (a spread subset; also the exact-match set)")
    ap.add_argument("--gen-batch", type=int, default=128, help="generation batch, SmolLM2-135M (and CPU)")
    ap.add_argument("--gen-batch-8b", type=int, default=128, help="generation batch, Llama-3-8B")
    ap.add_argument("--gen-questions-8b", type=int, default=128,
                    help="questions generated at Llama-3-8B (the first of --gen-questions)")
    ap.add_argument("--gen-cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None, help="token cap per example (GPU default 1024)")
    ap.add_argument("--repetition-penalty", type=float, default=1.1, help="as params.yaml eval.repetition_penalty")
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the random weights")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-self-check", action="store_true", help="skip the packed-vs-alone loss check")
    ap.add_argument("--ref-checkpointing", choices=["on", "off", "both"], default="both",
                    help="reference rows: on = as reference 003 prescribes; off = without checkpointing (what the "
                         "issue's anchor figures match, see README); both = one row each")
    ap.add_argument("--poll-ms", type=float, default=10.0, help="NVML polling interval; 0 = no NVML peak")
    ap.add_argument("--out", default=None, help="folder (gets <date>-<card>.json) or .json path")
    args = ap.parse_args(argv)
    cpu_profile = args.device == "cpu" and not args.tiny
    if args.tiny:
        args.shapes = ["tiny"]
    defaults = dict(  # (gpu, cpu default profile, tiny)
        train_examples=(128, 16, 8), project_epochs=(3, 1, 1), gen_questions=(256, 4, 8),
        loop_questions=(4, 4, 3), max_new_tokens=(160, 32, 8),
        # the references' 1024-token cap; the CPU default profile trains at params.yaml tokenize.max_length
        max_length=(MAX_LENGTH, 256, 96))
    col = 2 if args.tiny else (1 if cpu_profile else 0)
    for key, values in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, values[col])
    if cpu_profile:
        args.gen_batch = min(args.gen_batch, args.gen_questions)
    return args


def main(args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu --tiny to test the code)")
    if args.device == "cuda":
        from stages.lib.training import varlen_attention

        if not varlen_attention.varlen_available():
            log.warning("torch %s has no torch.nn.attention.varlen: packed rows fall back to per-sequence SDPA",
                        torch.__version__)
    from stages.lib.training import varlen_attention

    varlen_attention.register_varlen_attention()
    date = dt.date.today().isoformat()
    pairs, lengths_source = load_lengths(Path(args.lengths), args.seed)
    cap = args.max_length
    train_pairs = pick_examples(pairs, args.train_examples, args.seed, cap)
    gen_pairs = pick_examples(pairs, args.gen_questions, args.seed + 1, cap)
    log.info("lengths: %s; train set %d examples / %d tokens (longest %d); %d questions",
             lengths_source, len(train_pairs), sum(map(sum, train_pairs)), max(map(sum, train_pairs)),
             len(gen_pairs))
    info = device_info(args.device)
    rows = []
    result = {
        "card": info["name"], "date": date, "command": " ".join(["python3 -m benchmarks.bench_gpu"] + sys.argv[1:]),
        "device": info, "versions": versions(), "lengths": lengths_source,
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
    }
    path = output_path(args.out, date, card_slug(info["name"])) if args.out else None
    t0 = time.perf_counter()

    def save():  # after every bench, so a run cut off by a time limit still leaves its rows
        result.update(total_s=round(time.perf_counter() - t0, 1),
                      ratios=compute_ratios(rows, targets=args.device == "cuda"))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(path)

    if not args.skip_self_check:
        result["self_check"] = self_check(args.device, args.seed)
    for shape in args.shapes:
        if "train" in args.benches:
            rows += bench_train(shape, args.device, args, train_pairs)
            save()
        if "generate" in args.benches:
            rows += bench_generate(shape, args.device, args, gen_pairs)
            save()
    save()
    if path is not None:
        log.info("wrote %s", path)
    from benchmarks.render_table import render_markdown

    print(render_markdown(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    main(parse_args())
