"""Split: deterministic, leakage-free grouping, stratification, rare strata, invariants and the stage's errors."""

import json
import os
import random
import subprocess
import sys
from argparse import Namespace

import pytest
import yaml

from helpers import ROOT

from stages import split as split_stage
from stages.lib.io import read_jsonl, write_jsonl
from stages.lib.data.splitting import (SPLITS, SplitError, check_split, find_leaks, group_records, stratified_split,
                                  summarize_split)

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
QTYPES = {"information": 300, "symptoms": 200, "treatment": 150, "causes": 60, "stages": 12, "support groups": 1}


def make_records(seed: int = 0) -> list[dict]:
    """~720 records with MedQuAD's problems: repeated questions, repeated answers, chains linking them, foci."""
    rng = random.Random(seed)
    records = []
    for qtype, n in QTYPES.items():
        for i in range(n):
            focus = f"Disease {rng.randrange(120)}"
            records.append({"id": f"{qtype}-{i}", "qtype": qtype, "source": rng.choice(["GARD", "GHR", "NIDDK"]),
                            "focus": focus, "url": "", "question": f"What is {qtype} of {focus} number {i}?",
                            "answer": f"Answer {i} about {qtype} for {focus}."})
    for _ in range(60):  # the same question with another answer (case and spacing differ)
        a, b = rng.sample(range(len(records)), 2)
        records[b]["question"] = records[a]["question"].upper().replace(" ", "  ")
    for _ in range(60):  # the same answer under another question
        a, b = rng.sample(range(len(records)), 2)
        records[b]["answer"] = records[a]["answer"] + " "
    return records


def split_of(splits: dict) -> dict[str, str]:
    return {r["id"]: name for name, rows in splits.items() for r in rows}


def test_deterministic_for_a_seed_and_seed_matters():
    records = make_records()
    first = stratified_split(records, FRACTIONS, 7, ["qtype"])
    assert first == stratified_split(records, FRACTIONS, 7, ["qtype"])
    assert split_of(first) != split_of(stratified_split(records, FRACTIONS, 8, ["qtype"]))


def test_independent_of_pythonhashseed():
    # run in the repo root (`python -c` puts it first on sys.path) with tests/ importable, as pytest has them
    code = ("import json; from tests.stages.test_split import *; "
            "s = stratified_split(make_records(), FRACTIONS, 3, ['qtype', 'source'], 'focus'); "
            "print(json.dumps(split_of(s), sort_keys=True))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**env, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and outs.pop().startswith("{")


def test_input_is_not_mutated_and_nothing_is_lost():
    records = make_records()
    before = json.dumps(records)
    splits = stratified_split(records, FRACTIONS, 1, ["qtype"])
    assert json.dumps(records) == before
    assert sorted(r["id"] for rows in splits.values() for r in rows) == sorted(r["id"] for r in records)


@pytest.mark.parametrize("group_by", ["text", "focus"])
def test_no_normalized_text_is_shared_across_splits(group_by):
    splits = stratified_split(make_records(), FRACTIONS, 1, ["qtype"], group_by)
    leaks = find_leaks(splits, group_by)
    assert leaks == dict.fromkeys(leaks, 0) and ("focus" in leaks) == (group_by == "focus")


def test_groups_follow_chains_and_leave_empty_foci_apart():
    records = [
        {"question": "Q one?", "answer": "A one", "focus": ""},
        {"question": "q  ONE ?", "answer": "A two", "focus": ""},  # same question as 0
        {"question": "Q three?", "answer": "a two.", "focus": ""},  # same answer as 1 -> chain 0-1-2
        {"question": "Q four?", "answer": "A four", "focus": ""},
        {"question": "Q five?", "answer": "A five", "focus": "Gout"},
        {"question": "Q six?", "answer": "A six", "focus": "GOUT "},
    ]
    assert group_records(records, "text") == [[0, 1, 2], [3], [4], [5]]
    assert group_records(records, "focus") == [[0, 1, 2], [3], [4, 5]]


def test_every_stratum_gets_its_share_and_rare_strata_do_not_crash():
    records = make_records()
    splits = stratified_split(records, FRACTIONS, 1, ["qtype"])
    summary = summarize_split(splits, ["qtype"], FRACTIONS)
    assert summary["max_fraction_deviation_points"] <= 1.0
    for qtype, n in QTYPES.items():
        row = summary["strata"][qtype]
        if n >= 10:
            assert all(row[s] >= 1 for s in SPLITS), row
        if n >= 150:
            assert all(abs(row[s] / n - FRACTIONS[s]) <= 0.03 for s in SPLITS), row
    assert summary["strata"]["support groups"] == {"total": 1, "train": 1, "validation": 0, "test": 0}
    assert summary["strata_missing_from_a_split"] == {"support groups": ["validation", "test"]}


def test_several_stratify_keys():
    splits = stratified_split(make_records(), FRACTIONS, 1, ["qtype", "source"])
    summary = summarize_split(splits, ["qtype", "source"], FRACTIONS)
    assert "information|GARD" in summary["strata"] and summary["max_share_deviation"]["points"] < 1.0


def test_invariant_checks_catch_leaks_and_empty_splits():
    rec = {"id": "1", "question": "Same?", "answer": "x", "qtype": "a", "focus": ""}
    leaky = {"train": [rec], "validation": [{**rec, "id": "2", "answer": "y"}], "test": [{**rec, "id": "3"}]}
    leaks = find_leaks(leaky)
    assert leaks["question"] == 1 and leaks["answer"] == 1
    with pytest.raises(SplitError, match="shared across splits"):
        check_split(leaky, FRACTIONS, leaks, {}, {"a": 3})
    empty = {"train": [rec], "validation": [], "test": []}
    with pytest.raises(SplitError, match="validation, test would be empty"):
        check_split(empty, FRACTIONS, find_leaks(empty), {}, {"a": 1})


# ---------------------------------------------------------------- the stage


def run(tmp_path, records, **overrides):
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {"split": {**committed["split"], **overrides}, "task": {"type": "qa"}, "prepare": committed["prepare"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "prepared").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "prepared" / "qa.jsonl", records)
    args = Namespace(params=str(tmp_path / "params.yaml"), prepared=str(tmp_path / "prepared"), mcq_raw=None,
                     out=str(tmp_path / "split"), report=str(tmp_path / "split.json"))
    return split_stage.main(args)


def test_stage_writes_three_files_and_a_report(tmp_path):
    assert run(tmp_path, make_records()) == 0
    rows = {s: read_jsonl(tmp_path / "split" / f"{s}.jsonl") for s in SPLITS}
    assert set(rows["test"][0]) == {"id", "question", "answer", "qtype", "source", "focus", "url", "dataset"}
    report = json.loads((tmp_path / "split.json").read_text())
    assert report["counts"] == {s: len(rows[s]) for s in SPLITS}
    assert set(report["leaks"].values()) == {0} and report["run"]["python"]
    assert report["max_share_deviation"]["points"] < 2.0


def test_stage_rejects_unknown_params_key(tmp_path, caplog):
    assert run(tmp_path, make_records(), sead=3) == 1
    assert "[split]" in caplog.text and "sead" in caplog.text
    assert not (tmp_path / "split").exists() and not (tmp_path / "split.json").exists()


def test_stage_rejects_a_missing_stratify_field(tmp_path, caplog):
    assert run(tmp_path, make_records(), stratify_by=["qtype", "language"]) == 1
    assert "language" in caplog.text and not (tmp_path / "split").exists()


def test_stage_fails_cleanly_when_records_are_too_few(tmp_path, caplog):
    assert run(tmp_path, make_records()[:2]) == 1
    assert "would be empty" in caplog.text
    assert not (tmp_path / "split").exists() and not list(tmp_path.glob(".split.tmp-*"))
