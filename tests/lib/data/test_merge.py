"""Merging free-text datasets: qtype inference, exact/near duplicates across datasets, per-dataset splits, parsers."""

import json
import random

import pytest

from stages.lib.config import PrepareParams
from stages.lib.data.medquad import MalformedFileError, read_table, records_from_alpaca, records_from_table
from stages.lib.data.merge import merge_datasets, parse_extra
from stages.lib.data.near_duplicates import dedupe_across, jaccard, near_groups, shingles
from stages.lib.data.qtypes import MEDQUAD_QTYPES, assign_qtypes, canonical_qtype, infer_qtype
from stages.lib.data.splitting import SPLITS, split_datasets, stratified_split
from stages.lib.data.text import normalize_key

NEAR = (0.8, 3, 128)
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
WORDS = ("blood", "cells", "fever", "liver", "kidney", "pain", "swelling", "doctor", "rest", "fluids", "tablet",
         "daily", "weeks", "months", "children", "adults", "heart", "lungs", "skin", "rash", "infection", "dose")


def prose(rng, n=30):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def record(i, dataset, question=None, answer=None, qtype="information", rng=None):
    rng = rng or random.Random(i)
    return {"id": f"{dataset}/{i}", "question": question or f"What is fixture condition {dataset} {i}?",
            "answer": answer or prose(rng), "qtype": qtype, "source": dataset, "focus": "", "url": "",
            "dataset": dataset}


# ---------------------------------------------------------------- qtypes


@pytest.mark.parametrize("question, qtype", [
    ("What are the symptoms of Allergy?", "symptoms"),
    ("What causes Acne?", "causes"),
    ("How is Lupus diagnosed?", "exams and tests"),
    ("What are the treatments for Gout?", "treatment"),
    ("What to expect if I have Asthma (Outlook/Prognosis)?", "outlook"),
    ("When to seek urgent medical care when I have Allergy?", "when to contact a medical professional"),
    ("What are the side effects of metformin?", "side effects"),
    ("how much tylenol can i take a day", "dose"),
    ("Can I take ibuprofen with warfarin?", "interactions with medications"),
    ("What is Asthma?", "information"),
    ("Is it safe?", "other"),
])
def test_questions_are_typed_from_their_pattern(question, qtype):
    assert infer_qtype(question) == qtype
    assert qtype == "other" or qtype in MEDQUAD_QTYPES


def test_a_medquad_type_is_kept_and_counted_apart_from_inferred_ones():
    assert canonical_qtype(" Side  Effects") == "side effects" and canonical_qtype("Appearance") is None
    assert canonical_qtype("Interaction") == "interactions with medications"
    rows = [{"question": "What does it look like?", "qtype": "Appearance"},
            {"question": "What are the symptoms of X?", "qtype": "Usage"},
            {"question": "What are the symptoms of X?", "qtype": ""}]
    typed, from_pattern = assign_qtypes(rows)
    assert [r["qtype"] for r in typed] == ["other", "usage", "symptoms"] and from_pattern == [True, False, True]
    assert rows[0]["qtype"] == "Appearance"  # input not modified


# ---------------------------------------------------------------- near duplicates


def test_shingles_and_jaccard():
    assert shingles("What is  it?", 3) == frozenset(["what is it"])
    assert shingles("", 3) == frozenset() and len(shingles("a b c d e", 3)) == 3
    a, b = shingles("one two three four five six", 3), shingles("one two three four five seven", 3)
    assert jaccard(a, b) == pytest.approx(3 / 5)


def test_duplicates_are_removed_from_the_later_dataset_and_counted_per_pair():
    rng = random.Random(0)
    medquad = [record(i, "medquad", rng=rng) for i in range(20)]
    long_answer = medquad[3]["answer"].split()
    wikidoc = [record(i, "wikidoc", rng=rng) for i in range(10)] + [
        record(10, "wikidoc", question=medquad[0]["question"].upper()),       # same question, case aside
        record(11, "wikidoc", answer=medquad[1]["answer"] + "!"),              # same answer, punctuation aside
        record(12, "wikidoc", answer=" ".join(long_answer[:-1] + ["zzz"])),    # one word changed: near
        record(13, "wikidoc", question="Another question entirely?", answer=medquad[4]["answer"]),
    ]
    inside = record(14, "wikidoc", question=wikidoc[0]["question"])  # a duplicate inside WikiDoc stays
    medicationqa = [record(i, "medicationqa", rng=rng) for i in range(5)] + [
        record(5, "medicationqa", question=wikidoc[2]["question"])]
    kept, removed = dedupe_across([("medquad", medquad), ("wikidoc", wikidoc + [inside]),
                                   ("medicationqa", medicationqa)], *NEAR)
    assert kept["medquad"] == medquad
    assert removed["wikidoc vs medquad"] == {"question_exact": 1, "answer_exact": 2, "question_near": 0,
                                             "answer_near": 1}
    assert removed["medicationqa vs wikidoc"]["question_exact"] == 1
    assert sum(removed["medicationqa vs medquad"].values()) == 0
    assert [r["id"] for r in kept["wikidoc"]] == [f"wikidoc/{i}" for i in range(10)] + ["wikidoc/14"]
    assert len(kept["medicationqa"]) == 5


def test_near_groups_join_near_identical_texts_transitively():
    rng = random.Random(1)
    base = prose(rng, 40).split()
    rows = [record(0, "x", answer=" ".join(base)), record(1, "x", answer=" ".join(base[:-1] + ["zzz"])),
            record(2, "x", answer=" ".join(base[:-2] + ["zzz", "yyy"])), record(3, "x", rng=rng)]
    keys = near_groups(rows, *NEAR)
    assert keys[0] == keys[1] == keys[2] != keys[3]


# ---------------------------------------------------------------- per-dataset split


def medquad_like(n=300):
    rng = random.Random(2)
    return [record(i, "medquad", qtype=("information", "symptoms", "treatment")[i % 3], rng=rng) for i in range(n)]


def test_the_first_dataset_splits_exactly_as_alone_and_added_ones_get_their_own_test():
    medquad = medquad_like()
    rng = random.Random(3)
    added = [record(i, "wikidoc", qtype="symptoms", rng=rng) for i in range(60)]
    per_dataset, guard = split_datasets(medquad + added, FRACTIONS, 1234, ["qtype"], "text", NEAR)
    alone = stratified_split(medquad, FRACTIONS, 1234, ["qtype"], "text")
    assert per_dataset["medquad"] == alone
    assert all(per_dataset["wikidoc"][s] for s in SPLITS)
    assert {r["dataset"] for s in SPLITS for r in per_dataset["wikidoc"][s]} == {"wikidoc"}
    assert guard["wikidoc"] == {"train_or_validation_near_earlier_test": 0, "test_near_earlier_train_or_validation": 0}
    only, none = split_datasets(medquad, FRACTIONS, 1234, ["qtype"], "text", NEAR)
    assert only == {"medquad": alone} and none == {}


def test_an_added_record_near_a_medquad_test_record_never_reaches_training():
    medquad = medquad_like()
    test_ids = {r["id"] for r in stratified_split(medquad, FRACTIONS, 1234, ["qtype"], "text")["test"]}
    target = next(r for r in medquad if r["id"] in test_ids)
    rng = random.Random(4)
    added = [record(i, "wikidoc", qtype="symptoms", rng=rng) for i in range(60)]
    words = target["answer"].split()
    # near-identical copies: the near-duplicate grouping keeps them together, wherever that group lands
    copies = [record(60 + k, "wikidoc", qtype="symptoms", answer=" ".join(words[:-1] + [w]))
              for k, w in enumerate(("zzz", "yyy", "xxx", "www", "vvv", "uuu", "ttt", "sss", "rrr", "qqq"))]
    per_dataset, guard = split_datasets(medquad + added + copies, FRACTIONS, 1234, ["qtype"], "text", NEAR)
    fit = [r for s in ("train", "validation") for r in per_dataset["wikidoc"][s]]
    assert not {r["id"] for r in fit} & {r["id"] for r in copies}
    in_test = sum(r["id"] in {c["id"] for c in copies} for r in per_dataset["wikidoc"]["test"])
    assert guard["wikidoc"]["train_or_validation_near_earlier_test"] == len(copies) - in_test


# ---------------------------------------------------------------- parsing and merging


def test_alpaca_records_and_the_refusals():
    data = json.dumps([{"instruction": "Answer this question truthfully", "input": " What is X? ", "output": "X is."}])
    assert records_from_alpaca(data.encode(), "w.json")[0] | {} == {
        "id": "0", "question": "What is X?", "answer": "X is.", "qtype": "", "source": "", "focus": "", "url": ""}
    with pytest.raises(MalformedFileError, match=r"w.json: not valid JSON"):
        records_from_alpaca(b"[{", "w.json")
    with pytest.raises(MalformedFileError, match="expected a JSON list"):
        records_from_alpaca(b'{"input": "q"}', "w.json")
    with pytest.raises(MalformedFileError, match="record 1 lacks text field.s. output"):
        records_from_alpaca(json.dumps([{"instruction": "", "input": "q", "output": "a"},
                                        {"instruction": "", "input": "q"}]).encode(), "w.json")


def test_xlsx_tables_read_through_the_column_map(tmp_path):
    import pandas as pd

    path = tmp_path / "m.xlsx"
    pd.DataFrame([{"Question": "how to take drug 1", "Answer": "NA", "Question Type": "Usage", "URL": None}]).to_excel(
        path, index=False)
    rows = read_table(path)
    records = records_from_table(rows, {"question": "Question", "answer": "Answer", "url": "URL"}, "m.xlsx")
    assert (records[0]["question"], records[0]["answer"], records[0]["url"]) == ("how to take drug 1", "NA", "")
    with pytest.raises(MalformedFileError, match=r"m.xlsx: column\(s\) Focus not found"):
        records_from_table(rows, {"question": "Question", "answer": "Answer", "focus": "Focus"}, "m.xlsx")
    (tmp_path / "bad.xlsx").write_bytes(b"not a spreadsheet")
    with pytest.raises(MalformedFileError, match="cannot be read as a table"):
        read_table(tmp_path / "bad.xlsx")


def test_merge_counts_types_dedup_and_caps():
    rng = random.Random(5)
    medquad = [record(i, "medquad", rng=rng) for i in range(10)]
    wiki_rows = [{"instruction": "", "input": f"What are the symptoms of Fixturitis {i}?", "output": prose(rng)}
                 for i in range(12)] + [{"instruction": "", "input": medquad[0]["question"], "output": prose(rng)}]
    wiki = parse_extra("wikidoc", {"format": "alpaca"}, json.dumps(wiki_rows).encode(), "wikidoc/w.json")
    table = [{"Q": f"What is drug {i} used for?", "A": prose(rng)} for i in range(6)]
    med = parse_extra("medicationqa", {"format": "table", "columns": {"question": "Q", "answer": "A"}}, table, "m.xlsx")
    assert {r["dataset"] for r in wiki} == {"wikidoc"} and wiki[3]["id"] == "wikidoc/3"
    assert {r["source"] for r in med} == {"medicationqa"} and {r["qtype"] for r in med} == {""}
    entries = [("wikidoc", {"cap": 5}, wiki), ("medicationqa", {"cap": None}, med)]
    kept, report = merge_datasets([{k: v for k, v in r.items() if k != "dataset"} for r in medquad], entries,
                                  PrepareParams())
    by = {d: [r for r in kept if r["dataset"] == d] for d in ("medquad", "wikidoc", "medicationqa")}
    assert [len(by[d]) for d in by] == [10, 5, 6]
    row = report["datasets"]["wikidoc"]
    assert (row["in"], row["removed_as_cross_dataset_duplicates"], row["dropped_by_cap"], row["kept"]) == (13, 1, 7, 5)
    assert row["qtypes_from_pattern"] == 5 and row["per_qtype"] == {"symptoms": 5}
    assert report["datasets"]["medicationqa"]["qtypes_from_pattern_per_qtype"] == {"indication": 6}
    assert report["cross_dataset_duplicates"]["wikidoc vs medquad"]["question_exact"] == 1
    assert len({normalize_key(r["question"]) for r in kept}) == len(kept)
    alone, alone_report = merge_datasets(medquad, [], PrepareParams())
    assert alone == by["medquad"] and "cross_dataset_duplicates" not in alone_report
