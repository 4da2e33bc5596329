"""export: the merge is checked against base + adapter, the folder is complete and atomic, and the Modelfile's
Go template renders a conversation exactly as the tokenizer's chat template does (Ollama cannot run here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, write_tiny_adapter
from tools import export
from stages.lib.serving import ollama
from stages.lib.serving.merge import BASE_MARKER, merge_adapter

PARAMS = ROOT / "params.yaml"

# SmolLM2-135M-Instruct's own template (as its GGUF ships it): ChatML plus a default system turn.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct's template: BOS text before the first turn, contents trimmed.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SYSTEM = "You are a careful medical information assistant."
CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What causes diabetes?"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "What are the symptoms of glaucoma?"},
     {"role": "assistant", "content": "Often none at first.\n\nLater:\n- loss of side vision\n- halos"},
     {"role": "user", "content": "Is it inherited? {{ .Role }} <b>\u00e9\u00e8 \u4e2d\u6587</b>"}],
]


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_base_dir, tmp_path_factory) -> Path:
    return write_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def probe(tiny_tokenizer):
    return export.probe_ids(tiny_tokenizer, SYSTEM)


def reference_logits(base_dir, adapter_dir, ids):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        return base, model(input_ids=ids).logits


def export_args(base, adapter, out, metrics=None, **extra):
    argv = ["--params", str(PARAMS), "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--metrics", str(metrics or out.parent / "no-metrics.json")]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return export.build_parser().parse_args(argv)


# ---- merge ----

def test_float32_merge_matches_base_plus_adapter(tiny_base_dir, tiny_adapter_dir, probe):
    import torch

    merged, report, reference = merge_adapter(tiny_base_dir, tiny_adapter_dir, "float32", probe)
    base, expected = reference_logits(tiny_base_dir, tiny_adapter_dir, probe)
    assert report.ok and report.adapter_effect > 0.1  # the adapter matters, so a skipped merge would show
    assert (expected - base).abs().max() > 0.1
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=probe).logits, expected, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_merge_stays_within_tolerance(tiny_base_dir, tiny_adapter_dir, probe, dtype):
    import torch

    merged, report, reference = merge_adapter(tiny_base_dir, tiny_adapter_dir, dtype, probe)
    assert {p.dtype for p in merged.parameters()} == {getattr(torch, dtype)}
    assert [c.ok for c in report.checks] == [True, True]
    cast = report.checks[1]
    assert 0 < cast.max_abs_diff <= cast.tolerance  # rounding is visible but small
    assert cast.max_abs_diff < report.adapter_effect / 10


def test_merge_starts_from_unquantized_float32_base(tiny_base_dir):
    import torch

    from stages.lib.serving.merge import load_unquantized_base

    model = load_unquantized_base(tiny_base_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None


def test_merge_rejects_low_bit_dtypes(tiny_base_dir, tiny_adapter_dir, probe):
    with pytest.raises(ValueError, match="merge dtype"):
        merge_adapter(tiny_base_dir, tiny_adapter_dir, "int4", probe)


# ---- the export folder ----

def test_export_writes_complete_folder(tiny_base_dir, tiny_adapter_dir, tmp_path, probe):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "n_test": 96, "base": {"rougeL": 0.157, "bleu": 0.025}, "finetuned": {"rougeL": 0.288, "bleu": 0.108},
        "delta": {"rougeL": {"mean": 0.131, "ci95_low": 0.121, "ci95_high": 0.142}}}))
    out = tmp_path / "export"
    assert export.main(export_args(tiny_base_dir, tiny_adapter_dir, out, metrics)) == 0

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "Modelfile", BASE_MARKER, "export.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".export.tmp-*"))

    card = (out / "README.md").read_text()
    assert "| rougeL | 0.157 | 0.288 | +0.131 [+0.121, +0.142] |" in card
    assert "Held-out test questions: 96" in card
    assert "CC BY 4.0" in card and "doi:10.1186/s12859-019-3119-4" in card and "license: apache-2.0" in card
    assert "not medical advice" in card

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == \
        AutoTokenizer.from_pretrained(tiny_base_dir).apply_chat_template(
            CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.dtype == torch.bfloat16
    assert saved.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    _, expected = reference_logits(tiny_base_dir, tiny_adapter_dir, probe)
    with torch.no_grad():
        got = saved.float()(input_ids=probe).logits
    assert (got - expected).abs().max() < 0.05

    report = json.loads((out / "export.json").read_text())
    assert report["merge"]["ok"] and report["template"] == "chatml"
    assert json.loads((out / BASE_MARKER).read_text()) == json.loads((tiny_adapter_dir / BASE_MARKER).read_text())
    modelfile = ollama.parse_modelfile((out / "Modelfile").read_text())
    assert modelfile["FROM"] == "." and modelfile["SYSTEM"].startswith("You are a careful medical")


def test_card_without_metrics_says_so():
    assert "No evaluation was found" in export.metrics_table(None)


def test_failed_check_leaves_previous_export_untouched(tiny_base_dir, tiny_adapter_dir, tmp_path, caplog):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    assert export.main(export_args(tiny_base_dir, tiny_adapter_dir, out, atol=0, rtol=0)) == 1
    assert "export aborted: merged logits do not match base + adapter" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "keep.txt").is_file()


def test_export_rejects_missing_adapter(tiny_base_dir, tmp_path, caplog):
    assert export.main(export_args(tiny_base_dir, tmp_path / "nope", tmp_path / "export")) == 2
    assert "no adapter_config.json" in caplog.text and not (tmp_path / "export").exists()


def test_export_rejects_adapter_of_another_base(tiny_base_dir, tiny_adapter_dir, tmp_path, caplog):
    adapter = shutil.copytree(tiny_adapter_dir, tmp_path / "adapter")
    (adapter / BASE_MARKER).write_text(json.dumps({"weights_sha256": "0" * 64}))
    assert export.main(export_args(tiny_base_dir, adapter, tmp_path / "export")) == 2
    assert "different base model" in caplog.text


def test_base_checksum_prefers_what_base_model_recorded(tiny_base_dir, tiny_adapter_dir, tmp_path):
    from stages.lib.serving.merge import BaseMismatchError, check_same_base

    recorded = json.loads((tiny_adapter_dir / BASE_MARKER).read_text())["weights_sha256"]
    assert check_same_base(tiny_base_dir, tiny_adapter_dir) == recorded  # no source.json: hashed here
    base = shutil.copytree(tiny_base_dir, tmp_path / "base")
    (base / "source.json").write_text(json.dumps({"weights_sha256": "1" * 64}))
    with pytest.raises(BaseMismatchError, match="different base model"):
        check_same_base(base, tiny_adapter_dir)


# ---- Modelfile and its Go template ----

@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_modelfile_template_renders_like_chat_template(tiny_tokenizer, messages):
    text = ollama.build_modelfile(SYSTEM, ollama.CHATML, max_new_tokens=8, do_sample=False, temperature=0.7,
                                  top_p=0.9, repetition_penalty=1.1)
    template = ollama.parse_modelfile(text)["TEMPLATE"]
    expected = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ollama.render_go_template(template, messages) == expected


def custom_tokenizer(chat_template: str, bos_token: str | None = None):
    from stages.lib.testing.models import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    if bos_token:
        tokenizer.add_special_tokens({"bos_token": bos_token})
    return tokenizer


@pytest.mark.parametrize("chat_template,bos,kind", [
    (SMOLLM2_TEMPLATE, "<|im_start|>", "chatml"),
    (LLAMA3_TEMPLATE, "<|begin_of_text|>", "llama3"),
])
def test_real_model_templates_are_detected_and_reproduced(chat_template, bos, kind):
    tokenizer = custom_tokenizer(chat_template, bos)
    probe = tokenizer.apply_chat_template(list(ollama.PROBE_MESSAGES), tokenize=False, add_generation_prompt=True)
    detected = ollama.detect_template_kind(probe, tokenizer.bos_token)
    assert detected.kind.name == kind
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Llama-3 writes BOS as text; Ollama's tokenizer adds it as a token instead.
        assert detected.bos_prefix + ollama.render_go_template(detected.kind.template, messages) == expected


def test_unknown_template_is_refused_by_name():
    tokenizer = custom_tokenizer("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    probe = tokenizer.apply_chat_template(list(ollama.PROBE_MESSAGES), tokenize=False, add_generation_prompt=True)
    with pytest.raises(ollama.TemplateError, match="supports \\(chatml, llama3"):
        ollama.detect_template_kind(probe, None)


def test_modelfile_decoding_mirrors_eval_params():
    def params(do_sample):
        text = ollama.build_modelfile(SYSTEM, ollama.LLAMA3, max_new_tokens=160, do_sample=do_sample,
                                      temperature=0.7, top_p=0.9, repetition_penalty=1.1)
        return ollama.parse_modelfile(text)["PARAMETER"]

    greedy = params(False)
    assert ("temperature", "0") in greedy and not any(k == "top_p" for k, _ in greedy)
    assert ("num_predict", "160") in greedy and ("repeat_penalty", "1.1") in greedy
    assert [v for k, v in greedy if k == "stop"] == list(ollama.LLAMA3.stops)
    assert {("temperature", "0.7"), ("top_p", "0.9"), ("top_k", "0")} <= set(params(True))


def test_modelfile_refuses_unquotable_system_prompt():
    with pytest.raises(ollama.TemplateError, match='"""'):
        ollama.build_modelfile('say """hi"""', ollama.CHATML, max_new_tokens=8, do_sample=False,
                               temperature=1, top_p=1, repetition_penalty=1)


def test_go_renderer_trims_and_branches():
    template = ("A  {{- if .System }} [{{ .System }}]{{ else }} none{{ end -}}  \n"
                "{{ range .Messages }}{{ .Role }};{{ end }}")
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert ollama.render_go_template(template, msgs, system="S") == "A [S]user;assistant;"
    assert ollama.render_go_template(template, [], system="") == "A none"


@pytest.mark.parametrize("bad", ["{{ template \"x\" }}", "{{ range .Messages }}open", "{{ .Missing }}", "{{ end }}"])
def test_go_renderer_rejects_what_it_does_not_know(bad):
    with pytest.raises(ollama.TemplateError):
        ollama.render_go_template(bad, [])


@pytest.mark.parametrize("messages", CONVERSATIONS + [CONVERSATIONS[1][1:]])
@pytest.mark.parametrize("prompt_format", ["plain", "chatml"])
def test_modelfile_template_renders_like_the_prompt_format(tiny_tokenizer, messages, prompt_format):
    """The Modelfile of an adapter trained with model.prompt_format: plain or chatml writes what chat.py writes."""
    from stages.lib.model.chat import render_prompt_text
    from tools.export import modelfile_template

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m["content"] for m in messages if m["role"] != "system"]
    history = list(zip(turns[:-1:2], turns[1::2]))
    expected = render_prompt_text(system, turns[-1], history, prompt_format, tiny_tokenizer.eos_token)
    kind = modelfile_template(tiny_tokenizer, prompt_format).kind
    text = ollama.build_modelfile(system, kind, max_new_tokens=8, do_sample=False, temperature=0.7, top_p=0.9,
                                  repetition_penalty=1.1)
    assert ollama.parse_modelfile(text)["PARAMETER"][0] == ("stop", kind.stops[0])
    # Ollama passes the Modelfile SYSTEM as the first message; none when it is empty
    assert ollama.render_go_template(ollama.parse_modelfile(text)["TEMPLATE"], messages) == expected


def test_adapter_with_another_prompt_format_is_refused(tmp_path, tiny_adapter_dir):
    import shutil

    from stages.lib.model.chat import PromptFormatError
    from stages.lib.model.chat import check_recorded_format

    check_recorded_format(tiny_adapter_dir, "chat")  # no key in the marker: trained before the param = chat
    with pytest.raises(PromptFormatError, match="trained with model.prompt_format: chat, but params.yaml says plain"):
        check_recorded_format(tiny_adapter_dir, "plain")
    plain = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, plain)
    marker = json.loads((plain / BASE_MARKER).read_text())
    (plain / BASE_MARKER).write_text(json.dumps({**marker, "prompt_format": "plain"}))
    check_recorded_format(plain, "plain")
    with pytest.raises(PromptFormatError, match="model.prompt_format: plain, but params.yaml says chat"):
        check_recorded_format(plain, "chat")


def test_plain_adapter_exports_a_plain_modelfile_and_marker(tiny_base_dir, tiny_adapter_dir, tmp_path):
    import yaml

    from stages.lib.model.chat import render_prompt_text

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    marker = json.loads((adapter / BASE_MARKER).read_text())
    (adapter / BASE_MARKER).write_text(json.dumps({**marker, "prompt_format": "plain"}))
    raw = yaml.safe_load(PARAMS.read_text())
    out = tmp_path / "export"
    assert export.main(export_args(tiny_base_dir, adapter, out)) == 2  # params say chat: refused, nothing written
    assert not out.exists()
    raw["model"]["prompt_format"] = "plain"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = export_args(tiny_base_dir, adapter, out)
    args.params = str(tmp_path / "params.yaml")
    assert export.main(args) == 0
    assert json.loads((out / BASE_MARKER).read_text())["prompt_format"] == "plain"
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(out)  # its chat template is now the plain layout
    assert exported.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                        add_generation_prompt=True) == "### Question:\nQ?\n\n### Answer:\n"
    assert json.loads((out / "export.json").read_text())["template"] == "plain"
    modelfile = ollama.parse_modelfile((out / "Modelfile").read_text())
    assert ("stop", "<|im_end|>") in modelfile["PARAMETER"]  # the tiny tokenizer's EOS
    system = raw["tokenize"]["system_prompt"]
    assert ollama.render_go_template(modelfile["TEMPLATE"], [{"role": "system", "content": system},
                                                             {"role": "user", "content": "Q?"}]) == \
        render_prompt_text(system, "Q?", prompt_format="plain")
