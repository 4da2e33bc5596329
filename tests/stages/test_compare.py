"""Stage compare on hand-made predictions: output shapes, deltas, retrieval baseline and failure paths."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

from stages.compare import PARAMS, build_parser, main

QTYPES = ["symptoms", "causes", "treatment"]


def make_test_records(n=9):
    return [{"id": f"t{i}", "qtype": QTYPES[i % 3], "source": "GHR", "focus": f"d{i}",
             "question": f"What are the {QTYPES[i % 3]} of disease number {i}?",
             "answer": f"The {QTYPES[i % 3]} of disease {i} include fever and pain. See a doctor."}
            for i in range(n)]




def train_records():
    return [{"id": f"tr{i}", "qtype": q, "source": "GHR", "focus": "x",
             "question": f"What are the {q} of some disease?", "answer": f"Training answer about {q}."}
            for i, q in enumerate(QTYPES)]


def prediction_rows(records, good: bool):
    rows = []
    for i, rec in enumerate(records):
        text = rec["answer"] if good and i % 3 else ("I am not sure." if not good else "Fever and pain.")
        # The fine-tuned model finds the reference answers twice as likely per token.
        nll = 30.0 if not good else 30.0 - 10 * math.log(2)
        rows.append({"id": rec["id"], "qtype": rec["qtype"], "prediction": text, "n_new_tokens": 5,
                     "hit_eos": True, "ref_nll_sum": nll, "ref_n_tokens": 10, "ref_truncated": False})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def workspace(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    records = make_test_records()
    write_jsonl(split / "test.jsonl", records + make_test_records(12)[9:])  # 3 test questions never evaluated
    write_jsonl(split / "train.jsonl", train_records())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["bootstrap_samples"] = 200
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(tmp_path / "base.jsonl", prediction_rows(records, good=False))
    write_jsonl(tmp_path / "finetuned.jsonl", list(reversed(prediction_rows(records, good=True))))
    return tmp_path


def argv(ws: Path):
    return ["--params", str(ws / "params.yaml"), "--split", str(ws / "split"),
            "--base-preds", str(ws / "base.jsonl"), "--finetuned-preds", str(ws / "finetuned.jsonl"),
            "--metric", str(ROOT / "stages" / "lib" / "evaluation" / "medqa_metric"),
            "--metrics", str(ws / "out" / "headline.json"),
            "--details", str(ws / "out" / "metrics.json"),
            "--per-qtype", str(ws / "out" / "per_qtype.csv"), "--predictions", str(ws / "out" / "predictions.jsonl")]


def outputs(ws: Path):
    return sorted(p.name for p in (ws / "out").glob("*")) if (ws / "out").exists() else []


def test_params_match_dvc_yaml():
    assert tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["compare"]["params"]) == PARAMS


def test_compare_outputs(workspace):
    main(build_parser().parse_args(argv(workspace)))
    metrics = json.loads((workspace / "out" / "metrics.json").read_text())

    assert metrics["n_test"] == 9 and metrics["n_test_split"] == 12
    for system in ("base", "finetuned", "retrieval"):
        for key in ("bleu", "bleu_precisions", "brevity_penalty", "length_ratio", "rouge1", "rouge2", "rougeL",
                    "rougeLsum", "rouge1_nostem", "rougeLsum_nostem", "bertscore_f1"):
            assert key in metrics[system], (system, key)
        assert 0 <= metrics[system]["rougeL"] <= 1 and 0 <= metrics[system]["bleu"] <= 1
    assert "perplexity" not in metrics["retrieval"]
    # Perplexity halves (every reference token twice as likely), so the reduction is exactly 50%.
    assert metrics["base"]["perplexity"] == pytest.approx(math.exp(3.0))
    assert metrics["perplexity_reduction"]["value"] == pytest.approx(0.5)
    # Paired deltas: the mean equals the difference of the reported means, inside its CI.
    d = metrics["delta"]["rougeL"]
    assert d["mean"] == pytest.approx(metrics["finetuned"]["rougeL"] - metrics["base"]["rougeL"])
    assert d["ci95_low"] <= d["mean"] <= d["ci95_high"] and d["ci95_low"] > 0
    assert set(metrics["delta_vs_retrieval"]) == set(metrics["delta"]) >= {"rouge1", "rougeLsum", "bertscore_f1",
                                                                           "sentence_bleu"}
    assert metrics["git_commit"] is None or len(metrics["git_commit"]) == 40
    assert "libraries" in metrics
    # the metrics file DVC shows: the headline scores of each system and the ROUGE-L gain, no provenance
    headline = json.loads((workspace / "out" / "headline.json").read_text())
    assert set(headline) == {"split", "n_test", "base", "finetuned", "retrieval", "rougeL_gain"}
    assert headline["split"] == "test"
    assert set(headline["finetuned"]) == {"rougeL", "rouge1", "rouge2", "bleu", "bertscore_f1", "perplexity",
                                          "loop_rate"}
    assert 0 <= headline["finetuned"]["loop_rate"] <= 1
    assert set(headline["retrieval"]) == set(headline["finetuned"]) - {"perplexity"}
    assert headline["finetuned"]["rougeL"] == metrics["finetuned"]["rougeL"] and headline["rougeL_gain"] == d

    with open(workspace / "out" / "per_qtype.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["qtype"] for r in table] == sorted(QTYPES) and all(r["n"] == "3" for r in table)
    assert {"base_rougeL", "finetuned_rougeL", "retrieval_rougeL", "base_perplexity", "finetuned_bleu"} <= set(table[0])
    assert "retrieval_perplexity" not in table[0]
    # Numbers only: no MedQuAD text in the committed table.
    text = (workspace / "out" / "per_qtype.csv").read_text()
    assert "disease" not in text and "fever" not in text.lower()

    preds = [json.loads(line) for line in (workspace / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"t{i}" for i in range(9)]
    first = preds[0]
    assert {"id", "qtype", "question", "reference", "base", "finetuned", "retrieval"} <= set(first)
    # Retrieval copies the training answer of the nearest training question (same qtype wording here).
    assert all(p["retrieval"] == f"Training answer about {p['qtype']}." for p in preds)


def test_missing_predictions_is_a_clear_error(workspace):
    (workspace / "finetuned.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="finetuned predictions not found"):
        main(build_parser().parse_args(argv(workspace)))
    assert outputs(workspace) == []


def test_mismatched_ids_is_a_clear_error(workspace):
    rows = prediction_rows(make_test_records(), good=True)[:-1]
    write_jsonl(workspace / "finetuned.jsonl", rows)
    with pytest.raises(ValueError, match="different questions"):
        main(build_parser().parse_args(argv(workspace)))
    assert outputs(workspace) == []


def test_empty_predictions_is_a_clear_error(workspace):
    (workspace / "base.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(build_parser().parse_args(argv(workspace)))
    assert outputs(workspace) == []


def test_unknown_ids_and_token_mismatch_are_errors(workspace):
    rows = prediction_rows(make_test_records(), good=False)
    rows[0]["id"] = "not-in-test"
    write_jsonl(workspace / "base.jsonl", rows)
    ft = prediction_rows(make_test_records(), good=True)
    ft[0]["id"] = "not-in-test"
    write_jsonl(workspace / "finetuned.jsonl", ft)
    with pytest.raises(ValueError, match="not in the test split"):
        main(build_parser().parse_args(argv(workspace)))
    ft = prediction_rows(make_test_records(), good=True)
    ft[1]["ref_n_tokens"] = 11
    write_jsonl(workspace / "finetuned.jsonl", ft)
    write_jsonl(workspace / "base.jsonl", prediction_rows(make_test_records(), good=False))
    with pytest.raises(ValueError, match="reference tokens"):
        main(build_parser().parse_args(argv(workspace)))
    assert outputs(workspace) == []


def test_unknown_bertscore_model_is_a_config_error(workspace):
    from stages.lib.config import ConfigError

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["eval"]["bertscore_model"] = "roberta-large"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="bertscore_model"):
        main(build_parser().parse_args(argv(workspace)))


def test_validation_split_is_scored_against_validation_references(workspace):
    """eval.split: validation scores against validation.jsonl and says so; test predictions then do not match."""
    split = workspace / "split"
    (split / "validation.jsonl").write_text((split / "test.jsonl").read_text())
    (split / "test.jsonl").unlink()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["eval"]["split"] = "validation"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    main(build_parser().parse_args(argv(workspace)))
    headline = json.loads((workspace / "out" / "headline.json").read_text())
    assert headline["split"] == "validation" and headline["n_test"] == 9
    assert json.loads((workspace / "out" / "metrics.json").read_text())["split"] == "validation"
    write_jsonl(split / "validation.jsonl", make_test_records(12)[9:])  # other questions: a wrong-split run
    with pytest.raises(ValueError, match="not in the validation split.*same eval.split"):
        main(build_parser().parse_args(argv(workspace)))
