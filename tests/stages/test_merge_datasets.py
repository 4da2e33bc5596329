"""download -> prepare -> split with data.extra: fixture MedQuAD plus tiny WikiDoc/MedicationQA files, and refusals."""

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from fixtures.make_extra_fixture import (MEDICATIONQA, MEDICATIONQA_PLANTED, WIKIDOC, WIKIDOC_FILE, WIKIDOC_PLANTED,
                                         WIKIDOC_TOPICS, write_extra_datasets)
from fixtures.make_fixture_source import build_fixture_source
from helpers import ROOT

from stages import download, prepare, split
from stages.lib.config import ConfigError, load_params
from stages.lib.data.text import normalize_key
from stages.lib.io import read_jsonl

EXTRA = ["wikidoc", "medicationqa"]
# sha256 of each split's ids ("\n"-joined) on the fixture, from main's stages before data.extra existed (ea0d78b)
IDS_BEFORE = {"train": (45, "13d5fdf117397796c91422a4aa0f65c5778f0f7b0cf828b8eb639cf16248f6a1"),
              "validation": (4, "f8686b507250b91d908d9f83317c1df1645003440af67933e4dbf8710e7f6b4f"),
              "test": (4, "647da592ba83d9eb2d755f5267d5f35ebc58a4d34ce9369773728453d925f4fa")}


def write_params(folder: Path, source: Path, extra, **datasets) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source=str(source), extra=list(extra))
    for name, override in datasets.items():
        raw["data"]["datasets"][name].update(override)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def run_download(folder, params, manifest, datasets_manifest):
    return download.main(Namespace(params=str(params), manifest=str(manifest), datasets_manifest=str(datasets_manifest),
                                   out=str(folder / "raw"), report=str(folder / "download.json")))


def run_prepare(folder, params, raw=None):
    return prepare.main(Namespace(params=str(params), raw=str(raw or folder / "raw"), out=str(folder / "prepared"),
                                  report=str(folder / "prepare.json")))


def run_split(folder, params):
    return split.main(Namespace(params=str(params), prepared=str(folder / "prepared"), mcq_raw=None,
                                out=str(folder / "split"), report=str(folder / "split.json")))


def run_all(folder, source, manifest, datasets_manifest, extra):
    params = write_params(folder, source, extra)
    for step in (lambda: run_download(folder, params, manifest, datasets_manifest),
                 lambda: run_prepare(folder, params), lambda: run_split(folder, params)):
        assert step() == 0
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three stages on fixture MedQuAD alone and merged with both added datasets."""
    tmp = tmp_path_factory.mktemp("merge")
    source, manifest = build_fixture_source(tmp / "src", "dir")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDQUAD_SOURCE", raising=False)
        mp.delenv("MEDQA_DATASETS_DIR", raising=False)
        alone = run_all(tmp / "alone", source, manifest, ROOT / "stages/lib/data/datasets_manifest.json", [])
        medquad = next(r for r in read_jsonl(alone / "prepared" / "qa.jsonl") if len(r["answer"].split()) > 45)
        root, datasets_manifest = write_extra_datasets(tmp / "datasets", medquad)
        mp.setenv("MEDQA_DATASETS_DIR", str(root))
        merged = run_all(tmp / "merged", source, manifest, datasets_manifest, EXTRA)
    return {"alone": alone, "merged": merged, "source": source, "manifest": manifest, "root": root,
            "datasets_manifest": datasets_manifest}


@pytest.fixture
def env(monkeypatch, runs):
    monkeypatch.delenv("MEDQUAD_SOURCE", raising=False)
    monkeypatch.setenv("MEDQA_DATASETS_DIR", str(runs["root"]))
    return runs


def report(folder: Path, stage: str) -> dict:
    return json.loads((folder / f"{stage}.json").read_text())


# ---------------------------------------------------------------- download


def test_download_keeps_each_added_file_with_its_licence_and_no_local_path(runs):
    raw = runs["merged"] / "raw"
    assert (raw / "extra" / "wikidoc" / WIKIDOC_FILE).is_file()
    extra = json.loads((raw / "manifest.json").read_text())["extra"]
    assert extra["wikidoc"]["licence"] == "CC BY-SA 3.0 (fixture)" and extra["medicationqa"]["manifest"] == MEDICATIONQA
    assert str(runs["root"]) not in (raw / "manifest.json").read_text()
    assert report(runs["merged"], "download")["extra"]["wikidoc"]["origin"] == "env"
    # MedQuAD alone: the raw manifest has no extra key and no extra folder, as before
    assert "extra" not in json.loads((runs["alone"] / "raw" / "manifest.json").read_text())
    assert not (runs["alone"] / "raw" / "extra").exists()


def test_download_refuses_a_changed_file_and_writes_nothing(env, tmp_path, caplog):
    root = tmp_path / "datasets"
    shutil.copytree(env["root"], root)
    (root / WIKIDOC / WIKIDOC_FILE).write_text("[]")
    env_root = tmp_path / "run"
    params = write_params(env_root, env["source"], EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDQA_DATASETS_DIR", str(root))
        assert run_download(env_root, params, env["manifest"], env["datasets_manifest"]) == 1
    assert WIKIDOC_FILE in caplog.text and "does not match" in caplog.text
    assert not (env_root / "raw").exists() and not (env_root / "download.json").exists()


def test_download_refuses_a_file_the_manifest_does_not_list(env, tmp_path, caplog):
    params = write_params(tmp_path, env["source"], ["wikidoc"], wikidoc={"file": "other.json"})
    assert run_download(tmp_path, params, env["manifest"], env["datasets_manifest"]) == 1
    assert "'other.json' is not a file of wikidoc-patient-information" in caplog.text
    assert not (tmp_path / "raw").exists()


# ---------------------------------------------------------------- prepare


def test_prepare_counts_each_dataset_and_each_duplicate_pair(runs):
    rep = report(runs["merged"], "prepare")
    pairs = rep["cross_dataset_duplicates"]
    assert pairs["wikidoc vs medquad"] == WIKIDOC_PLANTED
    assert pairs["medicationqa vs wikidoc"] == MEDICATIONQA_PLANTED
    assert sum(pairs["medicationqa vs medquad"].values()) == 0
    wikidoc, medicationqa = rep["datasets"]["wikidoc"], rep["datasets"]["medicationqa"]
    assert wikidoc["kept"] == WIKIDOC_TOPICS and wikidoc["qtypes_from_pattern"] == WIKIDOC_TOPICS
    assert wikidoc["licence"] == "CC BY-SA 3.0 (fixture)" and wikidoc["upstream"].startswith("github:fixture/")
    assert wikidoc["per_qtype"] == {"causes": 10, "symptoms": 10, "other": 10}
    # MedicationQA's own types are MedQuAD names except "Appearance": those four rows are typed from the question
    assert medicationqa["kept"] == 19 and medicationqa["qtypes_from_pattern"] == 4
    assert "information" in medicationqa["per_qtype"] and "side effects" in medicationqa["per_qtype"]


def test_prepare_gives_every_record_its_dataset_and_leaves_medquad_as_it_was(runs):
    merged = read_jsonl(runs["merged"] / "prepared" / "qa.jsonl")
    alone = read_jsonl(runs["alone"] / "prepared" / "qa.jsonl")
    assert [r for r in merged if r["dataset"] == "medquad"] == alone
    assert {r["dataset"] for r in merged} == {"medquad", "wikidoc", "medicationqa"}
    assert {r["source"] for r in merged if r["dataset"] == "wikidoc"} == {"wikidoc"}
    assert len({r["id"] for r in merged}) == len(merged)


def broken_raw(runs, tmp_path: Path, name: str, file: str, content: bytes) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(runs["merged"] / "raw", raw)
    (raw / "extra" / name / file).write_bytes(content)
    return raw


def test_prepare_refuses_bad_json_and_writes_nothing(runs, tmp_path, caplog):
    raw = broken_raw(runs, tmp_path, "wikidoc", WIKIDOC_FILE, b'[{"input": ')
    params = write_params(tmp_path, runs["source"], EXTRA)
    assert run_prepare(tmp_path, params, raw) == 1
    assert f"wikidoc/{WIKIDOC_FILE}: not valid JSON" in caplog.text
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()


def test_prepare_refuses_a_missing_column_and_writes_nothing(runs, tmp_path, caplog):
    columns = {**yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["datasets"]["medicationqa"]["columns"],
               "question": "Questions"}
    params = write_params(tmp_path, runs["source"], EXTRA, medicationqa={"columns": columns})
    assert run_prepare(tmp_path, params, runs["merged"] / "raw") == 1
    assert "column(s) Questions not found" in caplog.text
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()


def test_prepare_refuses_an_added_dataset_that_keeps_nothing(runs, tmp_path, caplog):
    params = write_params(tmp_path, runs["source"], EXTRA)
    raw = yaml.safe_load(params.read_text())
    raw["prepare"]["qtypes"] = ["causes", "symptoms"]  # WikiDoc and MedQuAD have them, the drug questions not
    params.write_text(yaml.safe_dump(raw))
    assert run_prepare(tmp_path, params, runs["merged"] / "raw") == 1
    assert "data.extra dataset(s) medicationqa keep no record" in caplog.text
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()


def test_prepare_refuses_a_raw_folder_without_the_added_dataset(runs, tmp_path, caplog):
    params = write_params(tmp_path, runs["source"], EXTRA)
    assert run_prepare(tmp_path, params, runs["alone"] / "raw") == 1
    assert "rerun the download stage" in caplog.text and not (tmp_path / "prepared").exists()


# ---------------------------------------------------------------- split


def test_medquad_test_split_is_the_same_bytes_with_or_without_added_datasets(runs):
    alone, merged = runs["alone"] / "split", runs["merged"] / "split"
    assert (merged / "test.jsonl").read_bytes() == (alone / "test.jsonl").read_bytes()
    assert (alone / "test_added.jsonl").read_text() == ""
    for name in ("train", "validation"):
        rows = read_jsonl(merged / f"{name}.jsonl")
        assert [r for r in rows if r["dataset"] == "medquad"] == read_jsonl(alone / f"{name}.jsonl")
        assert {r["dataset"] for r in rows} == {"medquad", "wikidoc", "medicationqa"}
    added = read_jsonl(merged / "test_added.jsonl")
    assert {r["dataset"] for r in added} == {"wikidoc", "medicationqa"}
    rep = report(runs["merged"], "split")
    assert set(rep["per_dataset"]) == {"medquad", "wikidoc", "medicationqa"} and set(rep["leaks"].values()) == {0}
    assert "per_dataset" not in report(runs["alone"], "split")


def test_the_default_medquad_only_split_is_the_one_before_data_extra(runs):
    import hashlib

    for name, (count, digest) in IDS_BEFORE.items():
        ids = [r["id"] for r in read_jsonl(runs["alone"] / "split" / f"{name}.jsonl")]
        assert (len(ids), hashlib.sha256("\n".join(ids).encode()).hexdigest()) == (count, digest), name


def test_no_medquad_test_text_is_in_training(runs):
    merged = runs["merged"] / "split"
    test = read_jsonl(merged / "test.jsonl")
    held = {normalize_key(r[f]) for r in test for f in ("question", "answer")}
    fit = [r for name in ("train", "validation") for r in read_jsonl(merged / f"{name}.jsonl")]
    assert not {normalize_key(r[f]) for r in fit for f in ("question", "answer")} & held


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("data, message", [
    ({"extra": ["pubmed"]}, "extra names dataset(s) without a data.datasets entry: pubmed"),
    ({"extra": ["wikidoc", "wikidoc"]}, "extra lists a dataset twice"),
    ({"datasets": {"wikidoc": {"manifest": "m", "format": "alpaca", "file": "f", "cap": 0}}}, "cap must be null"),
    ({"datasets": {"wikidoc": {"manifest": "m", "format": "xml", "file": "f"}}}, "format must be one of alpaca"),
    ({"datasets": {"medicationqa": {"manifest": "m", "format": "table", "file": "f", "columns": {"answer": "A"}}}},
     "columns.question is required"),
    ({"datasets": {"medquad": {"manifest": "m", "format": "alpaca", "file": "f"}}}, "not 'medquad'"),
])
def test_bad_dataset_params_are_refused(tmp_path, data, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(tmp_path / "params.yaml", ("data",))


def test_the_report_page_names_each_added_dataset_with_its_licence(runs):
    from stages.report import data_facts

    merged = data_facts(report(runs["merged"], "download"), report(runs["merged"], "split"), {}, {})
    assert "licence: CC BY-SA 3.0 (fixture)" in merged["Added dataset wikidoc"]
    assert "github:fixture/" in merged["Added dataset medicationqa"] and "test " in merged["Added dataset wikidoc"]
    alone = data_facts(report(runs["alone"], "download"), report(runs["alone"], "split"), {}, {})
    assert not [k for k in alone if k.startswith("Added dataset")]
