"""The multiple-choice stages on fixture datasets and the tiny model: download_mcq -> prepare_mcq -> mcq (base and
fine-tuned) -> mcq_compare, and the ways each refuses bad input before heavy work."""

from __future__ import annotations

import csv
import json
from argparse import Namespace

import pytest

from fixtures.make_mcq_fixture import medmcqa_line, write_mcq_datasets
from helpers import write_params, write_tiny_adapter

MCQ = {"suites": ["medmcqa", "medqa", "pubmedqa", "mmlu"], "max_samples": {"medmcqa": 6, "mmlu": 4},
       "seed": 1, "k_shot": 1, "headline": "raw", "bootstrap_samples": 200}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    root, manifest = write_mcq_datasets(tmp_path / "datasets")
    monkeypatch.setenv("MEDQA_DATASETS_DIR", str(root))
    params = write_params(tmp_path / "params.yaml", mcq=MCQ, quant={"mode": "auto"})
    return {"tmp": tmp_path, "root": root, "manifest": manifest, "params": params}


def download(ws):
    from stages import download_mcq

    return download_mcq.main(Namespace(params=str(ws["params"]), manifest=str(ws["manifest"]),
                                       out=str(ws["tmp"] / "raw"), report=str(ws["tmp"] / "download.json")))


def prepare(ws):
    from stages import prepare_mcq

    return prepare_mcq.main(Namespace(params=str(ws["params"]), raw=str(ws["tmp"] / "raw"),
                                      out=str(ws["tmp"] / "questions.jsonl"), report=str(ws["tmp"] / "prepare.json")))


def test_the_chain_writes_metrics_numbers_only(ws, tiny_base_dir):
    from stages import mcq, mcq_compare

    assert download(ws) == 0 and prepare(ws) == 0
    report = json.loads((ws["tmp"] / "prepare.json").read_text())["suites"]
    assert {s: r["scored"] for s, r in report.items()} == {"medmcqa": 6, "medqa": 6, "pubmedqa": 4, "mmlu": 4}
    # k-shot only where a non-test pool exists
    assert {s: r["k_shot_used"] for s, r in report.items()} == {"medmcqa": 0, "medqa": 0, "pubmedqa": 1, "mmlu": 1}
    questions = [json.loads(line) for line in (ws["tmp"] / "questions.jsonl").read_text().splitlines()]
    assert all(q["pool"] == "test" and all(s["pool"] != "test" for s in q["shots"]) for q in questions)

    adapter = write_tiny_adapter(tiny_base_dir, ws["tmp"] / "adapter")
    for name, adapter_dir in (("base", None), ("finetuned", str(adapter))):
        mcq.main(Namespace(params=str(ws["params"]), questions=str(ws["tmp"] / "questions.jsonl"),
                           base=str(tiny_base_dir), adapter=adapter_dir, out=str(ws["tmp"] / f"{name}.jsonl"),
                           summary=str(ws["tmp"] / f"{name}.json")))
    base = [json.loads(line) for line in (ws["tmp"] / "base.jsonl").read_text().splitlines()]
    assert len(base) == 20 and all(len(r["logprob"]) == len(r["n_tokens"]) >= 2 for r in base)
    tuned = [json.loads(line) for line in (ws["tmp"] / "finetuned.jsonl").read_text().splitlines()]
    assert [r["logprob"] for r in tuned] != [r["logprob"] for r in base]  # the adapter changes the scores

    mcq_compare.main(Namespace(params=str(ws["params"]), base_scores=str(ws["tmp"] / "base.jsonl"),
                               finetuned_scores=str(ws["tmp"] / "finetuned.jsonl"),
                               metrics=str(ws["tmp"] / "metrics.json"), details=str(ws["tmp"] / "evaluation.json"),
                               per_subject=str(ws["tmp"] / "per_subject.csv")))
    metrics = json.loads((ws["tmp"] / "metrics.json").read_text())
    assert set(metrics) == {"medmcqa", "medqa", "pubmedqa", "mmlu"}
    for suite, row in metrics.items():
        assert all(isinstance(v, (int, float)) for v in row.values()), suite
        assert row["delta_ci95_low"] <= row["delta"] <= row["delta_ci95_high"]
    assert metrics["mmlu"]["chance"] == 0.25 and "base_macro_f1" in metrics["pubmedqa"]
    details = json.loads((ws["tmp"] / "evaluation.json").read_text())
    assert set(details["suites"]["medqa"]) >= {"raw", "per_token", "chance", "majority"}
    with open(ws["tmp"] / "per_subject.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["n"]) for r in rows if r["suite"] == "medmcqa") == 6


def test_a_checksum_mismatch_is_refused_and_nothing_written(ws, caplog):
    path = ws["root"] / "medqa-usmle" / "test.jsonl"
    path.write_text(path.read_text().replace("fever", "cough", 1))
    assert download(ws) == 1
    assert "medqa-usmle" in caplog.text and "checksum mismatch: test.jsonl" in caplog.text
    assert not (ws["tmp"] / "raw").exists() and not (ws["tmp"] / "download.json").exists()


def test_too_many_bad_records_stop_prepare_before_any_output(ws, caplog):
    assert download(ws) == 0
    anatomy = ws["tmp"] / "raw" / "medmcqa-dev" / "Anatomy.jsonl"
    anatomy.write_text(anatomy.read_text() + medmcqa_line(7, answer="F. nothing") + "\n")
    assert prepare(ws) == 1
    assert "medmcqa: 1 of 43 records dropped" in caplog.text and "answer letter outside the options" in caplog.text
    assert not (ws["tmp"] / "questions.jsonl").exists()


def test_an_adapter_trained_with_another_prompt_format_is_refused_before_loading(ws, tiny_base_dir):
    from stages import mcq
    from stages.lib.model.chat import PromptFormatError

    adapter = write_tiny_adapter(tiny_base_dir, ws["tmp"] / "adapter")
    (adapter / "base_model.json").write_text(json.dumps({"prompt_format": "plain"}))
    with pytest.raises(PromptFormatError, match="trained with model.prompt_format: plain"):
        mcq.main(Namespace(params=str(ws["params"]), questions="unused", base=str(tiny_base_dir),
                           adapter=str(adapter), out="unused", summary="unused"))


def test_task_mcq_trains_on_medmcqa_and_scores_only_its_held_out_part(ws):
    from fixtures.make_mcq_fixture import write_medmcqa
    from stages import prepare_mcq, split

    raw = ws["root"]  # the datasets as download_mcq lays them out; 10 questions per subject so each part gets some
    write_medmcqa(raw / "medmcqa-dev", per_subject=10)
    params = write_params(ws["tmp"] / "task.yaml", mcq={**MCQ, "max_samples": {}}, task={"type": "mcq"},
                          split={"seed": 5})
    out, report = ws["tmp"] / "split", ws["tmp"] / "split.json"
    args = Namespace(params=str(params), prepared=str(ws["tmp"] / "no-medquad-needed"), mcq_raw=str(raw),
                     out=str(out), report=str(report))
    assert split.main(args) == 0
    parts = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 168, "validation": 21, "test": 21}  # 21 subjects x 10
    assert set(parts["train"][0]) == set(split.FIELDS) and parts["train"][0]["source"] == "medmcqa"
    assert all(r["answer"].startswith("drug ") for rows in parts.values() for r in rows)  # the correct option text
    facts = json.loads(report.read_text())
    assert facts["task"] == "mcq" and facts["group_by"] == "question" and not any(facts["leaks"].values())

    assert prepare_mcq.main(Namespace(params=str(params), raw=str(raw), out=str(ws["tmp"] / "questions.jsonl"),
                                      report=str(ws["tmp"] / "prepare.json"))) == 0
    scored = {q["id"] for q in map(json.loads, (ws["tmp"] / "questions.jsonl").read_text().splitlines())
              if q["suite"] == "medmcqa"}
    assert scored == {r["id"] for r in parts["test"]}  # never a question it was trained or validated on
    note = json.loads((ws["tmp"] / "prepare.json").read_text())["suites"]["medmcqa"]["fine_tuned_on_this_suite"]
    assert note["held_out"] == 21 and note["trained_or_validated_on"] == 189


def test_task_mcq_without_the_mcq_data_is_refused_and_nothing_is_written(ws, caplog):
    from stages import split

    params = write_params(ws["tmp"] / "task.yaml", task={"type": "mcq"}, split={})
    out = ws["tmp"] / "split"
    args = Namespace(params=str(params), prepared=str(ws["tmp"]), mcq_raw=None, out=str(out),
                     report=str(ws["tmp"] / "split.json"))
    assert split.main(args) == 1
    assert "--mcq-raw" in caplog.text and not out.exists() and not (ws["tmp"] / "split.json").exists()
    args.mcq_raw = str(ws["tmp"] / "raw")  # not downloaded
    assert split.main(args) == 1
    assert "dvc repro download_mcq" in caplog.text and not out.exists()
