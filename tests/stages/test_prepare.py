"""Prepare: the three XML shapes, broken files, normalize/filter/dedupe counts, table sources, error paths."""

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from fixtures.make_fixture_source import BROKEN, SOURCE, TABLE_CSV
from helpers import ROOT

from stages import prepare
from stages.lib.config import PrepareParams
from stages.lib.io import read_jsonl
from stages.lib.data.medquad import (MalformedFileError, clean_records, parse_collection, parse_document,
                                     records_from_table)



def write_params(tmp_path: Path, data=None, prepare_=None) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    groups = {"data": {**raw["data"], **(data or {})}, "prepare": {**raw["prepare"], **(prepare_ or {})}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(groups))
    return path


def write_raw(tmp_path: Path, broken: list[str] = ()) -> Path:
    """A data/raw folder as the download stage leaves it, optionally with broken files dropped into GARD."""
    raw = tmp_path / "raw"
    shutil.copytree(SOURCE, raw / "medquad")
    for name in broken:
        shutil.copy(BROKEN / name, raw / "medquad" / "2_GARD_QA" / name)
    (raw / "manifest.json").write_text(json.dumps({"format": "medquad"}))
    return raw


def run(tmp_path, raw, **params):
    args = Namespace(params=str(write_params(tmp_path, **params)), raw=str(raw), out=str(tmp_path / "prepared"),
                     report=str(tmp_path / "prepare.json"))
    return prepare.main(args)


def parse(rel: str) -> list[dict]:
    return parse_document((SOURCE / rel).read_bytes(), rel)


# ---------------------------------------------------------------- parsing


def test_canonical_document():
    records = parse("9_CDC_QA/0000001.xml")
    assert [r["id"] for r in records] == ["9_CDC_QA/0000001-1", "9_CDC_QA/0000001-2", "9_CDC_QA/0000001-3"]
    first = records[0]
    assert first["question"] == "What is (are) Fixture Parasite ?"  # parsing does not normalize
    assert (first["qtype"], first["source"], first["focus"]) == ("information", "CDC", "Fixture Parasite")
    assert first["url"] == "http://www.cdc.gov/fixture/"


def test_diseasefile_variant():
    records = parse("9_CDC_QA/0000397.xml")
    assert len(records) == 3 and {r["source"] for r in records} == {"CDC"}
    assert records[1]["question"] == "Who is at risk for Parasites - Fixture Taeniasis? ?"
    assert records[1]["qtype"] == "susceptibility"


def test_lowercase_ninds_variant():
    records = parse("6_NINDS_QA/0000007.xml")
    assert [r["qtype"] for r in records] == ["information", "treatment", "outlook", "research"]
    assert {r["source"] for r in records} == {"NINDS"} and {r["focus"] for r in records} == {"Fixture-Adie"}
    assert records[0]["id"] == "6_NINDS_QA/0000007-1" and "\u00a0" in records[0]["answer"]


def test_unanswered_pairs_and_empty_focus_are_kept_by_the_parser():
    assert [r["answer"] for r in parse("11_MPlusDrugs_QA/0000001.xml")] == ["", ""]
    assert parse("2_GARD_QA/0000001.xml")[0]["answer"] == ""
    assert {r["focus"] for r in parse("9_CDC_QA/0000199.xml")} == {""}
    assert parse("5_NIDDK_QA/0000056.xml") == []


def test_ids_are_unique_although_document_ids_collide():
    records, skipped, files = parse_collection(SOURCE, skip_malformed=False)
    assert files == 20 and not skipped
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 62
    assert "1_CancerGov_QA/0000013_2_1-1" in ids and "1_CancerGov_QA/0000013_3_1-1" in ids


@pytest.mark.parametrize("name,reason", [
    ("not_well_formed.xml", "not well-formed XML"),
    ("wrong_root.xml", "unknown root element <html>"),
    ("missing_pid.xml", "without a pid"),
    ("duplicate_pid.xml", "pid 1 appears twice"),
    ("no_qapairs.xml", "no <QAPairs>"),
])
def test_broken_file_error_names_the_file(name, reason):
    with pytest.raises(MalformedFileError, match=rf"^2_GARD_QA/{name}: .*{reason}"):
        parse_document((BROKEN / name).read_bytes(), f"2_GARD_QA/{name}")


# ---------------------------------------------------------------- normalize / filter / dedupe


def test_clean_counts_every_drop_reason():
    records, _, _ = parse_collection(SOURCE, skip_malformed=False)
    kept, counts = clean_records(records, PrepareParams())
    assert counts["in"] == 62 and counts["answered"] == 55 and counts["kept"] == len(kept) == 53
    assert counts["dropped_by_reason"]["no_answer"] == 7
    assert counts["dropped_by_reason"]["answer_too_short"] == 1  # CDC's "Topics"
    assert counts["dropped_by_reason"]["duplicate"] == 1  # the same pair in SeniorHealth and NHLBI
    assert counts["in"] == counts["kept"] + counts["dropped"]
    assert counts["per_source"]["ADAM"] == {"in": 3, "kept": 0}
    assert sum(v["kept"] for v in counts["per_qtype"].values()) == 53
    by_id = {r["id"]: r for r in kept}
    assert by_id["1_CancerGov_QA/0000001_1-1"]["answer"].startswith(
        "Key Points\n- Adult acute lymphoblastic leukemia (ALL) is a type of cancer of the blood and bone marrow. - ")
    assert by_id["9_CDC_QA/0000397-2"]["question"] == "Who is at risk for Parasites - Fixture Taeniasis?"
    assert "\u00a0" not in by_id["6_NINDS_QA/0000007-1"]["answer"]


def test_filters_by_qtype_and_length_and_dedupe_can_be_off():
    records, _, _ = parse_collection(SOURCE, skip_malformed=False)
    kept, counts = clean_records(records, PrepareParams(qtypes=["symptoms", "nonexistent"]))
    assert {r["qtype"] for r in kept} == {"symptoms"} and counts["qtypes_not_found"] == ["nonexistent"]
    kept, counts = clean_records(records, PrepareParams(min_answer_chars=150, max_question_chars=40))
    assert all(len(r["answer"]) >= 150 and len(r["question"]) <= 40 for r in kept)
    assert counts["dropped_by_reason"]["question_too_long"] > 0 and counts["dropped_by_reason"]["answer_too_short"] > 1
    kept, counts = clean_records(records, PrepareParams(dedupe="none"))
    assert counts["dropped_by_reason"]["duplicate"] == 0 and len(kept) == 54


def test_clean_does_not_mutate_its_input():
    records = [{"id": "a", "question": "What is X ?", "answer": "Some  answer text here.", "qtype": "information",
                "source": "S", "focus": "X", "url": ""}]
    before = json.dumps(records)
    clean_records(records, PrepareParams())
    assert json.dumps(records) == before


# ---------------------------------------------------------------- table sources


def test_csv_export_rows_become_records():
    from stages.lib.data.medquad import read_table

    columns = {"question": "Question", "answer": "Answer", "qtype": "qtype", "focus": None, "source": None, "url": None}
    records = records_from_table(read_table(TABLE_CSV), columns, "table.csv")
    assert len(records) == 24 and records[0]["id"] == "table-0"
    assert records[0]["source"] == "table" and records[0]["focus"] == ""
    assert records[4]["answer"].count("\n") == 2  # a quoted multi-line cell survives
    assert records[19]["answer"] == "NA"  # text, not a missing value
    assert records[21]["answer"] == ""  # an empty cell
    kept, counts = clean_records(records, PrepareParams())
    assert counts["dropped_by_reason"] == {"no_answer": 1, "qtype_excluded": 0, "question_too_short": 1,
                                           "question_too_long": 0, "answer_too_short": 1, "answer_too_long": 0,
                                           "duplicate": 1}
    assert len(kept) == 20


def test_table_with_a_missing_column_is_named():
    with pytest.raises(MalformedFileError, match="table.csv: column.*Frage"):
        records_from_table([{"Question": "q", "Answer": "a"}], {"question": "Frage", "answer": "Answer"}, "table.csv")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_prepare_stage_on_table_sources(tmp_path, suffix):
    import pandas as pd

    raw = tmp_path / "raw"
    raw.mkdir()
    frame = pd.read_csv(TABLE_CSV, dtype=str, keep_default_na=False)
    table = raw / f"table{suffix}"
    if suffix == ".csv":
        shutil.copy(TABLE_CSV, table)
    elif suffix == ".jsonl":
        frame.to_json(table, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(table)
    (raw / "manifest.json").write_text(json.dumps({"format": "table", "table": table.name}))
    assert run(tmp_path, raw, data={"format": "table"}) == 0
    rows = read_jsonl(tmp_path / "prepared" / "qa.jsonl")
    assert len(rows) == 20
    assert set(rows[0]) == {"id", "question", "answer", "qtype", "source", "focus", "url", "dataset"}


# ---------------------------------------------------------------- the stage


def test_stage_writes_records_and_report(tmp_path):
    assert run(tmp_path, write_raw(tmp_path)) == 0
    rows = read_jsonl(tmp_path / "prepared" / "qa.jsonl")
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert len(rows) == report["kept"] == 53 and report["files_parsed"] == 20 and report["skipped"] == []
    assert report["run"]["libraries"] and "git_commit" in report["run"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # sorted path order, whatever the filesystem


def test_malformed_file_is_an_error_naming_it(tmp_path, caplog):
    assert run(tmp_path, write_raw(tmp_path, ["not_well_formed.xml"])) == 1
    assert "2_GARD_QA/not_well_formed.xml" in caplog.text and "not well-formed" in caplog.text
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()
    assert not list(tmp_path.glob(".prepared.tmp-*"))


def test_skip_malformed_names_each_skipped_file(tmp_path):
    raw = write_raw(tmp_path, ["wrong_root.xml"])
    assert run(tmp_path, raw, prepare_={"skip_malformed": True}) == 0
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert report["files_skipped"] == 1 and report["files_parsed"] == 21
    assert report["skipped"][0]["file"] == "2_GARD_QA/wrong_root.xml" and report["kept"] == 53


def test_too_many_malformed_files_is_an_error_even_when_skipping(tmp_path, caplog):
    raw = write_raw(tmp_path, sorted(p.name for p in BROKEN.glob("*.xml")))
    assert run(tmp_path, raw, prepare_={"skip_malformed": True}) == 1
    assert "5 of 25 files are malformed" in caplog.text
    assert not (tmp_path / "prepared").exists()


def test_nothing_left_after_filtering_is_an_error(tmp_path, caplog):
    assert run(tmp_path, write_raw(tmp_path), prepare_={"qtypes": ["symptom"]}) == 1  # typo of "symptoms"
    assert "nothing left after filtering 62 records" in caplog.text and "qtype_excluded" in caplog.text
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()


def test_unknown_params_key_is_an_error(tmp_path, caplog):
    assert run(tmp_path, write_raw(tmp_path), prepare_={"min_answer_char": 5}) == 1
    assert "[prepare]" in caplog.text and "min_answer_char" in caplog.text
    assert not (tmp_path / "prepared").exists()


def test_format_mismatch_asks_to_rerun_download(tmp_path, caplog):
    assert run(tmp_path, write_raw(tmp_path), data={"format": "table"}) == 1
    assert "rerun the download stage" in caplog.text
