"""Every family, end to end: a tiny random-init model of each decoder family (stages/lib/testing/families.py:
Llama, Mistral, Qwen2, Gemma 3, Falcon, Phi-3) goes base_model -> tokenize -> two training steps -> evaluate ->
ask -> export with its merge check, with the family's chat template and with model.prompt_format: plain.

The tokenizer is the tests' own (trained here on a few sentences, with each family's special tokens and template):
family-specific tokenizer behaviour is out of scope; the architectures, their module names, tied heads, biases,
sliding windows and logit soft-capping are what these runs exercise.
"""

from __future__ import annotations

import io
import json
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, Probe, assert_only_lora_changed, make_args, run_tokenize

from stages.lib.testing.families import FAMILIES

# (family, prompt_format, lora.target_modules): the template runs use all-linear, the plain ones the named list
RUNS = [(name, fmt) for name in sorted(FAMILIES) for fmt in ("chat", "plain")
        if fmt == "plain" or FAMILIES[name].chat_template]
# Chat templates the Ollama Modelfile cannot express (the system prompt folded into the first user turn)
NO_MODELFILE = {"mistral", "gemma3"}
OLLAMA_KIND = {"llama": "llama3", "qwen2": "chatml", "phi3": "phi3"}


@pytest.fixture(scope="module")
def raw_folders(tmp_path_factory):
    """Each family's tiny release folder, written once for the module."""
    from stages.lib.testing.families import write_family_base

    root = tmp_path_factory.mktemp("families")
    return {name: write_family_base(name, root / name) for name in FAMILIES}


def full_params(path: Path, prompt_format: str) -> Path:
    """The project's params.yaml, small eval, with this run's prompt format."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"].update({"max_samples": 4, "max_new_tokens": 4, "batch_size": 4})
    params["model"]["prompt_format"] = prompt_format
    path.write_text(yaml.safe_dump(params))
    return path


def run_base_model(tmp_path: Path, raw: Path, prompt_format: str) -> Path:
    from stages import base_model

    (tmp_path / "base_params.yaml").write_text(yaml.safe_dump({"model": {"source": str(raw),
                                                                          "prompt_format": prompt_format}}))
    base_model.main(Namespace(params=str(tmp_path / "base_params.yaml"), out=str(tmp_path / "base"),
                              report=str(tmp_path / "base_model.json")))
    return tmp_path / "base"


@pytest.mark.parametrize("name,prompt_format", RUNS, ids=[f"{n}-{f}" for n, f in RUNS])
def test_family_runs_the_whole_pipeline(tmp_path, raw_folders, name, prompt_format):
    import torch
    from transformers import AutoModelForCausalLM

    from stages import evaluate, train
    from tools import ask, export

    family = FAMILIES[name]
    base = run_base_model(tmp_path, raw_folders[name], prompt_format)
    info = json.loads((base / "source.json").read_text())
    assert info["architecture"] == family.architecture and "added_tokens" not in info

    tokenized = run_tokenize(tmp_path, base, prompt_format=prompt_format)
    # answers that fit end on the family's end-of-turn token (<|eot_id|>, </s>, <end_of_turn>, <|end|>, EOS)
    assert json.loads(Path(tokenized.report).read_text())["splits"]["train"]["with_end_of_turn"] > 0
    targets = "all-linear" if prompt_format == "chat" else list(family.named_targets)
    probe = Probe()
    args = make_args({"root": tmp_path, "base": base, "tokenized": Path(tokenized.out)}, "run",
                     lora={"target_modules": targets}, train={"max_steps": 2, "save_steps": 10},
                     prompt_format=prompt_format)
    metrics = train.main(args, callbacks=[probe])
    assert metrics["global_step"] == 2
    assert_only_lora_changed(probe)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in probe.before if ".lora_A" in n}
    assert adapted == set(family.linear_modules if targets == "all-linear" else family.named_targets)
    # the CPU default levers: chunked loss on for every family (Gemma's soft-capping applied inside it)
    assert metrics["speedups"]["chunked_loss"] is True and metrics["speedups"]["attention"] == "sdpa"
    adapter = Path(args.out)

    params = full_params(tmp_path / "params.yaml", prompt_format)
    evaluate.main(evaluate.build_parser().parse_args(
        ["--params", str(params), "--split", str(tmp_path / "split"), "--base", str(base), "--adapter", str(adapter),
         "--out", str(tmp_path / "finetuned.jsonl"), "--summary", str(tmp_path / "finetuned.json")]))
    rows = [json.loads(line) for line in (tmp_path / "finetuned.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "finetuned.json").read_text())
    assert len(rows) == 4 and all(r["ref_n_tokens"] > 0 and r["ref_nll_sum"] > 0 for r in rows)
    assert summary["perplexity"] > 1

    out = io.StringIO()
    code = ask.main(ask.build_parser().parse_args(["What causes diabetes?", "--params", str(params), "--base",
                                                    str(base), "--adapter", str(adapter), "--max-new-tokens", "4",
                                                    "--repetition-penalty", "1.3"]), out=out)
    assert code == 0 and out.getvalue().startswith(ask.DISCLAIMER)

    exported = tmp_path / "export"
    argv = ["--params", str(params), "--base", str(base), "--adapter", str(adapter), "--out", str(exported),
            "--metrics", str(tmp_path / "none.json")]
    skip_modelfile = prompt_format == "chat" and name in NO_MODELFILE
    if skip_modelfile:
        assert export.main(export.build_parser().parse_args(argv)) == 2  # refused before the merge, by name
        assert not exported.exists()
        argv.append("--no-modelfile")
    assert export.main(export.build_parser().parse_args(argv)) == 0
    report = json.loads((exported / "export.json").read_text())
    merge = report["merge"]
    assert merge["ok"] and len(merge["checks"]) == 3 and merge["adapter_effect_max_abs"] > 0
    assert (exported / "Modelfile").is_file() != skip_modelfile
    kind = None if skip_modelfile else "plain" if prompt_format == "plain" else OLLAMA_KIND[name]
    assert report["template"] == kind
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert type(merged).__name__ == family.architecture
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert tied == AutoModelForCausalLM.from_pretrained(base).config.tie_word_embeddings


def test_a_chat_run_on_a_family_without_a_template_is_refused_naming_plain(tmp_path, raw_folders):
    """Falcon's release (like most base models) has no chat template: chat is refused before the weights load."""
    from stages.lib.model.chat import PromptFormatError

    with pytest.raises(PromptFormatError, match="has no chat template.*set model.prompt_format: plain"):
        run_base_model(tmp_path, raw_folders["falcon"], "chat")
    assert not (tmp_path / "base").exists()


def test_a_lora_target_the_family_lacks_is_refused_before_the_model_loads(tmp_path, raw_folders, monkeypatch):
    from stages import train
    from stages.lib.config import ConfigError
    from stages.lib.training import setup

    base = run_base_model(tmp_path, raw_folders["falcon"], "plain")
    tokenized = run_tokenize(tmp_path, base, prompt_format="plain")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the targets were checked")

    monkeypatch.setattr(setup, "load_base_model", no_loading)
    args = make_args({"root": tmp_path, "base": base, "tokenized": Path(tokenized.out)}, "bad",
                     lora={"target_modules": ["q_proj", "v_proj"]}, prompt_format="plain")
    with pytest.raises(ConfigError, match=r"\['q_proj', 'v_proj'\] not found in FalconForCausalLM; linear "
                                          r"modules available: \['dense', 'dense_4h_to_h', 'dense_h_to_4h', "
                                          r"'query_key_value'\]"):
        train.main(args)
    assert not Path(args.out).exists()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_in_nf4_with_the_frozen_weights_upcast(tmp_path, raw_folders, name):
    """QLoRA's path (bitsandbytes NF4 on CPU, PEFT's k-bit preparation: upcast_frozen auto on CPU) per family."""
    import math

    from stages import train

    base = run_base_model(tmp_path, raw_folders[name], "plain")
    tokenized = run_tokenize(tmp_path, base, prompt_format="plain")
    args = make_args({"root": tmp_path, "base": base, "tokenized": Path(tokenized.out)}, "nf4",
                     quant={"mode": "nf4"}, train={"max_steps": 2, "save_steps": 10, "eval_steps": 0},
                     prompt_format="plain")
    metrics = train.main(args)
    assert metrics["precision"]["quant"] == "nf4" and metrics["speedups"]["upcast_frozen"] is True
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"])
    assert (Path(args.out) / "adapter_model.safetensors").is_file()
