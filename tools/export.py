"""Merge the LoRA adapter into a 16-bit copy of the base and write a self-contained model folder:
safetensors weights, tokenizer with its chat template, a model card (README.md) and an Ollama Modelfile (unless
--no-modelfile: for a chat template the Modelfile cannot express).

Not part of `dvc repro` (`make export` runs it). Nothing is written unless the merged model's logits
match base + adapter, before and after saving; the folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from stages.lib.model.chat import (HF_TEMPLATES, PromptFormatError, check_prompt_format, check_recorded_format,
                                   end_of_turn_ids, render_prompt_ids)
from stages.lib.config import ConfigError, load_params
from stages.lib.io import atomic_dir, read_json, run_metadata, setup_logging
from stages.lib.serving.merge import (BASE_MARKER, BaseMismatchError, MergeCheckError, Tolerances,
                                      check_same_base, compare_logits, merge_adapter)
from stages.lib.serving.ollama import (CHATML, PROBE_MESSAGES, DetectedTemplate, TemplateError, build_modelfile,
                                       detect_template_kind, plain_kind)
from stages.lib.versions import check_versions

log = logging.getLogger("tools.export")

# The groups the model card describes (same convention as the DVC stages, should export become one).
PARAMS = ("data", "split", "model", "tokenize", "train", "eval")
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "gguf")

CITATION = ('Asma Ben Abacha and Dina Demner-Fushman. "A question-entailment approach to question answering". '
            "BMC Bioinformatics 20(1):511, 2019. doi:10.1186/s12859-019-3119-4")

# A short made-up exchange: the probe only needs realistic token patterns in the template, not real data.
PROBE_HISTORY = [("What are the symptoms of glaucoma?",
                  "Glaucoma often has no symptoms at first; side vision is lost slowly.")]
PROBE_QUESTION = "How is it treated?"


def metrics_table(metrics: dict | None) -> str:
    """Markdown table of base vs fine-tuned scores (and the paired-bootstrap delta) from reports/evaluation.json."""
    if not metrics:
        return "No evaluation was found at export time (`dvc repro` writes reports/evaluation.json).\n"
    base, tuned, delta = metrics.get("base", {}), metrics.get("finetuned", {}), metrics.get("delta", {})
    rows = ["| metric | base | fine-tuned | change (95% CI) |", "|---|---|---|---|"]
    for name in tuned:
        if not isinstance(tuned[name], (int, float)):
            continue
        d = delta.get(name)
        change = f"{d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]" if isinstance(d, dict) else ""
        b = base.get(name)
        rows.append(f"| {name} | {b:.3f} | {tuned[name]:.3f} | {change} |" if isinstance(b, (int, float))
                    else f"| {name} |  | {tuned[name]:.3f} | {change} |")
    return f"Held-out test questions: {metrics.get('n_test', '?')}.\n\n" + "\n".join(rows) + "\n"


def build_model_card(params: dict, lora: dict, metrics: dict | None, report: dict, base_sha: str,
                     template: str, base_license: str, out_dir: str, commit: str | None,
                     modelfile: bool = True) -> str:
    data, split, model, tok, train, ev = (params[g] for g in PARAMS)
    targets = lora.get("target_modules")
    if isinstance(targets, list):  # PEFT saves every adapted module path; the layer kinds are what matters
        targets = ", ".join(sorted({name.split(".")[-1] for name in targets}))
    base_name = f"{model.gguf_file} from {model.source}" if model.gguf_file else model.source
    checks = "\n".join(f"| {c['name']} | {c['max_abs_diff']:.3g} | {c['tolerance']:.3g} | {c['top1_agreement']:.3f} |"
                       for c in report["checks"])
    samples = tok.max_train_samples or "all"
    fractions = " / ".join(f"{name} {share:g}" for name, share in split.fractions.items())
    steps = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs} epoch(s)"
    return f"""---
license: {base_license}
library_name: transformers
pipeline_tag: text-generation
tags: [medical, question-answering, lora, merged, medquad]
---

# Medical QA model: {base_name} + LoRA fine-tuned on MedQuAD

A LoRA adapter trained on MedQuAD question-answer pairs, merged into a {report['dtype']} copy of the base model.

**Educational use only.** Answers may be wrong, incomplete or out of date; they are not medical advice.

## Data
MedQuAD (47k question-answer pairs from 12 NIH websites; the answers of 3 MedlinePlus collections are not
distributed and so not used), from `{data.source}`. Split {fractions} by {split.group_by} groups, so
records that share text never straddle train and test; {samples} training examples, at most {tok.max_length} tokens each.

## Training
Values from params.yaml at export time (git commit {commit or 'unknown'}); `dvc status` tells whether
models/adapter was trained with them. LoRA values come from the adapter itself.

- Base weights sha256: `{base_sha}`
- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout={lora.get('lora_dropout')}, targets={targets}, rsLoRA={lora.get('use_rslora')}, DoRA={lora.get('use_dora')}
- {steps}, learning rate {train.learning_rate} ({train.lr_scheduler}), batch {train.per_device_batch_size} x {train.gradient_accumulation_steps} accumulation, seed {train.seed}
- Chat template: {template}; system prompt: "{tok.system_prompt}"

## Evaluation
Decoding: {'sampling' if ev.do_sample else 'greedy'}, at most {ev.max_new_tokens} new tokens, repetition penalty {ev.repetition_penalty}
(also the defaults in generation_config.json and the Modelfile).

{metrics_table(metrics)}
## Merge check
Logits on a probe conversation, against base + adapter in float32 (largest adapter effect: {report['adapter_effect_max_abs']:.3g}).

| check | max abs diff | tolerance | top-1 agreement |
|---|---|---|---|
{checks}

## Use
- transformers: `AutoModelForCausalLM.from_pretrained(this_folder)`, prompts through the tokenizer's chat template.
- This project: `python -m tools.ask --merged {out_dir} "What causes glaucoma?"`
- {"Ollama: `ollama create medquad -f Modelfile`, then `ollama run medquad`." if modelfile else
   "Ollama: no Modelfile was written (exported with --no-modelfile: the chat template is not one it can express)."}

## Licence and citation
The base model's licence is `{base_license}`; MedQuAD is released under CC BY 4.0, which asks for this citation:

> {CITATION}
"""


def write_text_json(path: Path, obj) -> None:
    # Inside the atomic folder already, so a plain write (with normal permissions) is enough.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def probe_ids(tokenizer, system_prompt: str, prompt_format: str = "chat"):
    import torch

    return torch.tensor([render_prompt_ids(tokenizer, system_prompt, PROBE_QUESTION, PROBE_HISTORY, prompt_format)])


def modelfile_template(tokenizer, prompt_format: str) -> DetectedTemplate:
    """The Ollama template for model.prompt_format: the tokenizer's own chat template must be one Ollama's side
    can express; plain and chatml are written by chat.py and have a Go twin here."""
    if prompt_format == "plain":
        return DetectedTemplate(plain_kind(tokenizer.eos_token), "")
    if prompt_format == "chatml":
        return DetectedTemplate(CHATML, "")
    probe = tokenizer.apply_chat_template(list(PROBE_MESSAGES), tokenize=False, add_generation_prompt=True)
    return detect_template_kind(probe, tokenizer.bos_token)


def export(args, params: dict, metrics: dict | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.model.loading import load_tokenizer

    base_sha = check_same_base(args.base, args.adapter)
    prompt_format = params["model"].prompt_format
    check_recorded_format(args.adapter, prompt_format)
    tokenizer = load_tokenizer(args.base)
    check_prompt_format(tokenizer, prompt_format, f"the tokenizer in {args.base}")
    system_prompt, ev = params["tokenize"].system_prompt, params["eval"]
    # Detect the template before the (slow) merge so an unsupported model fails in seconds.
    template = None if args.no_modelfile else modelfile_template(tokenizer, prompt_format)
    modelfile = None if template is None else build_modelfile(
        system_prompt, template.kind, max_new_tokens=ev.max_new_tokens, do_sample=ev.do_sample,
        temperature=ev.temperature, top_p=ev.top_p, repetition_penalty=ev.repetition_penalty)
    template_name = template.kind.name if template else f"the tokenizer's own ({prompt_format}; no Modelfile)"
    ids = probe_ids(tokenizer, system_prompt, prompt_format)
    tolerances = Tolerances(cast_atol=args.atol, cast_rtol=args.rtol)
    merged, report, reference = merge_adapter(args.base, args.adapter, args.dtype, ids, tolerances)

    # Default decoding for anyone calling generate() on the export: the evaluated settings, stopping at end of turn.
    gen = merged.generation_config
    gen.max_new_tokens, gen.do_sample = ev.max_new_tokens, ev.do_sample
    gen.repetition_penalty, gen.eos_token_id = ev.repetition_penalty, sorted(end_of_turn_ids(tokenizer, prompt_format))
    if ev.do_sample:
        gen.temperature, gen.top_p, gen.top_k = ev.temperature, ev.top_p, 0

    lora = read_json(Path(args.adapter) / "adapter_config.json")
    if prompt_format != "chat":  # the export's own chat template is the layout it was trained on
        tokenizer.chat_template = HF_TEMPLATES[prompt_format]
    with atomic_dir(args.out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged
        # Reload what was written: catches tensors lost on save (e.g. tied embeddings) before the rename.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        with torch.no_grad():
            saved = compare_logits("saved files vs base+adapter", reference, reloaded(input_ids=ids).logits,
                                   tolerances.cast_atol, tolerances.cast_rtol)
        if not saved.ok:
            raise MergeCheckError(f"the saved model drifts from base + adapter: max |diff| {saved.max_abs_diff:.3g}")
        summary = report.as_dict()
        summary["checks"].append(saved.as_dict())
        meta = run_metadata()
        if modelfile is not None:
            (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
        (tmp / "README.md").write_text(build_model_card(params, lora, metrics, summary, base_sha, template_name,
                                                        args.base_license, str(args.out), meta["git_commit"],
                                                        modelfile is not None), encoding="utf-8")
        fmt = {} if prompt_format == "chat" else {"prompt_format": prompt_format}  # as train writes it
        write_text_json(tmp / BASE_MARKER, {"weights_sha256": base_sha, **fmt})
        write_text_json(tmp / "export.json", {"merge": summary, "template": template.kind.name if template else None,
                                              "bos_added_by_runtime": template.bos_prefix if template else None,
                                              **meta})
        # mkdtemp and the safetensors writer make owner-only files; an export is meant to be shared (e.g. with Ollama)
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
    log.info("wrote %s (%s, %s template)", args.out, args.dtype, template_name)


def main(args) -> int:
    check_versions(LIBRARIES)
    try:
        for folder, marker, hint in ((args.base, "config.json", "dvc repro base_model"),
                                     (args.adapter, "adapter_config.json", "dvc repro train")):
            if not (Path(folder) / marker).is_file():
                raise FileNotFoundError(f"nothing to export: no {marker} in {folder} (run `{hint}` first)")
        params = load_params(args.params, PARAMS)
        metrics = read_json(args.metrics) if args.metrics and Path(args.metrics).is_file() else None
        if metrics is None:
            log.warning("no metrics at %s; the model card will say so", args.metrics)
        export(args, params, metrics)
    except (ConfigError, BaseMismatchError, TemplateError, PromptFormatError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except MergeCheckError as err:  # nothing was written
        log.error("export aborted: %s", err)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--adapter", default="models/adapter")
    parser.add_argument("--metrics", default="reports/metrics.json", help="evaluation for the model card (optional)")
    parser.add_argument("--out", default="models/export")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="storage precision; bfloat16 cannot overflow, float16 keeps more digits")
    parser.add_argument("--atol", type=float, default=Tolerances.cast_atol,
                        help="16-bit logit check: allowed |diff| = atol + rtol * max |logit|")
    parser.add_argument("--rtol", type=float, default=Tolerances.cast_rtol)
    parser.add_argument("--base-license", default="apache-2.0", help="licence of the base model, for the card")
    parser.add_argument("--no-modelfile", action="store_true",
                        help="write the merged model without an Ollama Modelfile (for a chat template it cannot "
                             "express, e.g. Mistral's or Gemma's, which fold the system prompt into the first turn)")
    return parser


if __name__ == "__main__":
    setup_logging()
    sys.exit(main(build_parser().parse_args()))
