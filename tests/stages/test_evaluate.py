"""Stage evaluate on the tiny model: output rows, subset selection, base vs adapter runs, failure paths."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

from stages.evaluate import PARAMS, build_parser, main, select_questions

QTYPES = ["symptoms", "causes", "treatment", "inheritance"]


def make_records(n: int, prefix: str = "test") -> list[dict]:
    return [{"id": f"{prefix}-{i}", "qtype": QTYPES[i % len(QTYPES)], "source": "GHR", "focus": f"disease {i}",
             "question": f"What are the {QTYPES[i % len(QTYPES)]} of disease {i}?",
             "answer": f"Disease {i} is a condition. It affects about {i + 1} in 10,000 people."}
            for i in range(n)]


def write_split(folder: Path, test: list[dict], train: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test", test), ("train", train or make_records(12, "train"))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_params(path: Path, **eval_overrides) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"].update({"max_samples": 6, "max_new_tokens": 6, "batch_size": 4, **eval_overrides})
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B, so base and fine-tuned really differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(out)
    return out


def run(tmp_path, base, split, adapter=None, name="base", params=None):
    args = ["--params", str(params or write_params(tmp_path / "params.yaml")), "--split", str(split),
            "--base", str(base), "--out", str(tmp_path / f"{name}.jsonl"),
            "--summary", str(tmp_path / f"{name}.json")]
    if adapter:
        args += ["--adapter", str(adapter)]
    main(build_parser().parse_args(args))
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    return rows, json.loads((tmp_path / f"{name}.json").read_text())


def test_params_match_dvc_yaml():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("evaluate_base", "evaluate_finetuned"):
        assert tuple(stages[stage]["params"]) == PARAMS


def test_base_and_finetuned_runs(tmp_path, tiny_base_dir, tiny_adapter):
    split = write_split(tmp_path / "split", make_records(10))
    base_rows, base_summary = run(tmp_path, tiny_base_dir, split)
    ft_rows, ft_summary = run(tmp_path, tiny_base_dir, split, adapter=tiny_adapter, name="finetuned")

    assert len(base_rows) == 6 and base_summary["n_questions"] == 6
    assert base_summary["n_split"] == 10 and base_summary["split"] == "test"
    assert set(base_rows[0]) == {"id", "qtype", "prediction", "n_new_tokens", "hit_eos", "ref_nll_sum",
                                 "ref_n_tokens", "ref_truncated"}
    # Every qtype is represented; the same fixed-seed subset for both models.
    assert {r["qtype"] for r in base_rows} == set(QTYPES)
    assert [r["id"] for r in base_rows] == [r["id"] for r in ft_rows]
    # Same answers, same tokenizer: the same tokens are scored, with different likelihoods.
    assert [r["ref_n_tokens"] for r in base_rows] == [r["ref_n_tokens"] for r in ft_rows]
    assert [r["ref_nll_sum"] for r in base_rows] != [r["ref_nll_sum"] for r in ft_rows]
    assert all(0 <= r["n_new_tokens"] <= 6 and r["ref_nll_sum"] > 0 for r in base_rows)
    assert base_summary["model"] == "base" and ft_summary["model"] == "finetuned"
    assert base_summary["perplexity"] > 1 and "libraries" in base_summary
    # The tiny model's context (1024 tokens) holds every answer whole.
    assert base_summary["ref_truncated"] == 0

    # The stage folds the adapter into the float32 weights; the unmerged PeftModel scores the same.
    from stages.lib.model.chat import encode_example
    from stages.lib.config import QuantParams
    from stages.lib.evaluation.generation import score_answers
    from stages.lib.model.loading import load_model_for_inference

    model, tok, _ = load_model_for_inference(tiny_base_dir, tiny_adapter, QuantParams())
    system = yaml.safe_load((ROOT / "params.yaml").read_text())["tokenize"]["system_prompt"]
    by_id = {r["id"]: r for r in make_records(10)}
    examples = [encode_example(tok, system, by_id[r["id"]]["question"], by_id[r["id"]]["answer"], 1024)
                for r in ft_rows]
    unmerged = score_answers(model, examples, 4, tok.pad_token_id, progress=False)
    assert [s.nll_sum for s in unmerged] == pytest.approx([r["ref_nll_sum"] for r in ft_rows], rel=1e-4)


def test_select_questions_is_stratified_and_deterministic():
    records = make_records(40)
    a = select_questions(records, 8, seed=1)
    assert a == select_questions(records, 8, seed=1)
    assert sorted(r["qtype"] for r in a) == sorted(QTYPES * 2)
    assert select_questions(records, None, seed=1) == records


@pytest.mark.parametrize("records, message", [
    ([], "empty"),
    ([{"id": "a", "qtype": "x", "question": "q?"}], "lacks answer"),
    (make_records(2) + make_records(1), "not unique"),
])
def test_select_questions_rejects_bad_records(records, message):
    with pytest.raises(ValueError, match=message):
        select_questions(records, 4, seed=0)


def test_missing_test_split_is_a_clear_error(tmp_path, tiny_base_dir):
    with pytest.raises(FileNotFoundError, match="no test split"):
        run(tmp_path, tiny_base_dir, tmp_path / "nowhere")
    assert not (tmp_path / "base.jsonl").exists()


def test_missing_adapter_is_a_clear_error(tmp_path, tiny_base_dir):
    split = write_split(tmp_path / "split", make_records(4))
    with pytest.raises(FileNotFoundError, match="adapter"):
        run(tmp_path, tiny_base_dir, split, adapter=tmp_path / "no_adapter", name="finetuned")
    assert not (tmp_path / "finetuned.jsonl").exists()


def test_parser_needs_paths():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--params", "p.yaml"])
    assert isinstance(build_parser().parse_args(["--params", "p", "--split", "s", "--base", "b", "--out", "o",
                                                 "--summary", "s.json"]), argparse.Namespace)


def test_choose_decoding_uses_train_and_validation_only(tmp_path, tiny_base_dir, capsys):
    from tools.choose_decoding import build_parser as bench_parser
    from tools.choose_decoding import main as bench_main

    split = write_split(tmp_path / "split", make_records(8))
    (split / "validation.jsonl").write_text((split / "test.jsonl").read_text())
    (split / "test.jsonl").unlink()  # the benchmark must not need it
    args = ["--params", str(write_params(tmp_path / "params.yaml")), "--train", str(split / "train.jsonl"),
            "--validation", str(split / "validation.jsonl"), "--base", str(tiny_base_dir), "--n", "4",
            "--max-new-tokens", "3,6", "--repetition-penalty", "1.0,1.2", "--out", str(tmp_path / "r.json")]
    result = bench_main(bench_parser().parse_args(args))
    assert [(r["repetition_penalty"], r["max_new_tokens"]) for r in result["decoding"]] == [
        (1.0, 3), (1.0, 6), (1.2, 3), (1.2, 6)]
    assert result["train_answer_lengths"][0]["qtype"] == "ALL" and result["n_validation"] == 4
    assert "Train answer lengths" in capsys.readouterr().out
    with pytest.raises(ValueError, match="train/validation only"):
        bench_main(bench_parser().parse_args(args[:4] + ["--validation", str(split / "test.jsonl")] + args[6:]))


def test_validation_split_is_evaluated_without_reading_test(tmp_path, tiny_base_dir):
    """eval.split: validation answers validation.jsonl (where choices are made) and never opens test.jsonl."""
    split = write_split(tmp_path / "split", make_records(8))
    (split / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_records(7, "val")))
    (split / "test.jsonl").unlink()
    rows, summary = run(tmp_path, tiny_base_dir, split, params=write_params(tmp_path / "p.yaml", split="validation"))
    assert {r["id"].split("-")[0] for r in rows} == {"val"} and len(rows) == 6
    assert summary["split"] == "validation" and summary["n_split"] == 7
    with pytest.raises(FileNotFoundError, match="no test split at"):
        run(tmp_path, tiny_base_dir, split, name="test_run")



@pytest.mark.parametrize("phase,line", [
    ("generate", "out of memory while generating: lower eval.batch_size (now 4) or eval.max_new_tokens"),
    ("score", "out of memory while scoring the reference answers: lower eval.batch_size (now 4)"),
])
def test_out_of_memory_ends_with_the_params_to_lower(tmp_path, tiny_base_dir, monkeypatch, phase, line):
    import traceback

    import torch
    from transformers.models.llama import modeling_llama

    from stages.lib.evaluation import generation

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")

    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", no_memory)
    if phase == "score":  # answers generated, then the scoring forward runs out
        monkeypatch.setattr(generation, "generate_answers", lambda model, tok, prompts, *a, **k: [
            generation.Generation(text="an answer", token_ids=(5, 6), hit_eos=True)] * len(prompts))
    split = write_split(tmp_path / "split", make_records(6))
    with pytest.raises(torch.OutOfMemoryError) as caught:
        run(tmp_path, tiny_base_dir, split)
    assert traceback.format_exception(caught.value)[-1].strip() == f"torch.OutOfMemoryError: {line}"
    assert "Tried to allocate 3.00 GiB" in str(caught.value.__cause__)
    assert not (tmp_path / "base.jsonl").exists() and not (tmp_path / "base.json").exists()


def test_adapter_trained_with_another_prompt_format_is_refused_before_loading(tmp_path, tiny_base_dir, tiny_adapter):
    import shutil

    from stages.lib.model.chat import PromptFormatError

    split = write_split(tmp_path / "split", make_records(4))
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "base_model.json").write_text(json.dumps({"weights_sha256": "0" * 64, "prompt_format": "plain"}))
    with pytest.raises(PromptFormatError, match="model.prompt_format: plain, but params.yaml says chat"):
        run(tmp_path, tiny_base_dir, split, adapter=adapter, name="finetuned")
    assert not (tmp_path / "finetuned.jsonl").exists()


def test_plain_prompt_format_is_what_evaluate_asks_and_scores(tmp_path, tiny_base_dir, tiny_tokenizer):
    from stages.lib.model.chat import IGNORE_INDEX, encode_example

    records = make_records(4)
    split = write_split(tmp_path / "split", records)
    params = write_params(tmp_path / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["model"]["prompt_format"] = "plain"
    params.write_text(yaml.safe_dump(raw))
    rows, summary = run(tmp_path, tiny_base_dir, split, params=params)
    system = raw["tokenize"]["system_prompt"]
    by_id = {r["id"]: r for r in records}
    for row in rows:
        rec = by_id[row["id"]]
        enc = encode_example(tiny_tokenizer, system, rec["question"], rec["answer"], 1024, "plain")
        assert row["ref_n_tokens"] == sum(t != IGNORE_INDEX for t in enc.labels)  # answer + EOS, as trained
