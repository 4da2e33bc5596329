"""Unsloth as a training peer (issue 21), in its own install folder and its own process.

Unsloth pins its own transformers/TRL (2026.10.9: transformers <= 5.17, trl <= 1.15, datasets < 5) and patches
transformers when imported, so it never shares a process with the project's pinned stack. Same work as
benchmarks.bench_gpu's train rows: the same examples (real MedQuAD lengths, random token ids), the same 1024-token
cap, LoRA r 16 alpha 16 on the seven projections, random weights of the real shape (written once to a local folder:
Unsloth loads models by path only). Unsloth's documented defaults: FastLanguageModel.from_pretrained
(load_in_4bit for the 8B shape, 16-bit below), get_peft_model(lora_dropout=0, use_gradient_checkpointing="unsloth"),
batches of 2 padded to the longest, 8-bit AdamW, bf16.

    PYTHONPATH=<unsloth folder>:$PWD python -m benchmarks.bench_unsloth --shape smollm2-135m --out $OUT/unsloth.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("bench_unsloth")


def write_random_model(shape: str, folder: Path, seed: int, init_std: float) -> None:
    """A random-init Llama of `shape` plus a word-level tokenizer over its vocabulary, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from benchmarks.bench_gpu import SHAPES

    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg, initializer_range=init_std, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token=f"t{cfg['eos_token_id']}", pad_token=f"t{cfg['pad_token_id']}",
                                  bos_token=f"t{cfg['bos_token_id']}")
    tok.save_pretrained(folder)


def run(args) -> dict:
    import unsloth  # noqa: F401  (must be imported before transformers: it patches it)
    import torch
    from unsloth import FastLanguageModel

    from benchmarks import bench_gpu
    from benchmarks.bench_gpu import LORA_TARGETS, SHAPES, TrainRecipe

    shape = args.shape
    folder = Path(args.model_dir) / shape
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_random_model(shape, folder, args.seed, args.init_std)
        log.info("wrote the random %s model to %s in %.0f s", shape, folder, time.perf_counter() - t)
    big = shape == "llama3-8b"
    t_build = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=args.max_length,
                                                 dtype=torch.bfloat16, load_in_4bit=big, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0,
                                             target_modules=list(LORA_TARGETS), bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=args.seed)
    build_s = time.perf_counter() - t_build
    model.train()
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)
    pairs, lengths_source = bench_gpu.load_lengths(Path(args.lengths), args.seed)
    cfg = SHAPES[shape]
    train_pairs = bench_gpu.pick_examples(pairs, args.train_examples, args.seed, args.max_length)
    examples = bench_gpu.make_train_examples(train_pairs, cfg["vocab_size"], cfg["eos_token_id"], args.seed)
    recipe = TrainRecipe(None, "bfloat16", False, True, "pairs", batch_size=2)
    batches = bench_gpu.plan_train_batches(examples, recipe, cfg["pad_token_id"], args.seed)
    bench_gpu.reset_peak("cuda")

    def step(batch):
        batch = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        return bench_gpu.optimizer_step(loss, params, opt)

    losses, seconds, monitor = bench_gpu.timed_steps(step, batches, "cuda", 2, args.poll_ms)
    tokens = sum(bench_gpu.batch_tokens(b) for b in batches)
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    if not all(math.isfinite(x) for x in loss_values):
        raise RuntimeError(f"{shape}/unsloth: non-finite training loss")
    return {"bench": "train", "shape": shape, "recipe": "unsloth", "tokens_per_s": round(tokens / seconds, 1),
            "seconds": round(seconds, 2), "tokens": tokens, "examples": len(examples), "steps": len(batches),
            "first_loss": round(loss_values[0], 4), "last_loss": round(loss_values[-1], 4),
            **bench_gpu.memory_fields("cuda", monitor), "build_s": round(build_s, 1), "lengths": lengths_source}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "bitsandbytes", "xformers",
                 "triton", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["smollm2-135m", "llama3-8b"], default="smollm2-135m")
    ap.add_argument("--model-dir", default="/tmp/unsloth-models")
    ap.add_argument("--lengths", default=str(Path(__file__).resolve().parent / "lengths.json"))
    ap.add_argument("--train-examples", type=int, default=128, help="as bench_gpu's GPU default")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--poll-ms", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    result = {"command": " ".join(["python -m benchmarks.bench_unsloth"] + sys.argv[1:]), "versions": versions(),
              "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "UNSLOTH_DISABLE_STATISTICS")}}
    try:
        result["row"] = run(args)
        code = 0
    except Exception as err:  # a peer that cannot run here is a result to report, with its exact error
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
        log.error("unsloth could not run: %s", result["error"])
        code = 1
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
