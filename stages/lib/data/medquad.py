"""MedQuAD XML documents (all three schema shapes) and table exports -> flat QA records.

A record is a plain dict with the fields RECORD_FIELDS. Parsing keeps unanswered pairs (answer "") and raw text so
that clean_records, which normalizes, filters and de-duplicates, can count everything it drops.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import zipfile
from pathlib import PurePosixPath

from stages.lib.data.text import normalize_answer, normalize_question

RECORD_FIELDS = ("id", "question", "answer", "qtype", "source", "focus", "url")
# Why clean_records drops a record, in the order they are checked.
DROP_REASONS = ("no_answer", "qtype_excluded", "question_too_short", "question_too_long", "answer_too_short",
                "answer_too_long", "duplicate")


class MalformedFileError(ValueError):
    """A source file cannot be read as MedQuAD; the message starts with the file's name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


# Tag and attribute names per root element. The canonical shape is `Document`; one CDC file uses `DiseaseFile`
# with the same children; four NINDS files use a lower-case `doc` schema (see shared/medquad/DATASET.md).
_SCHEMAS = {
    "Document": dict(source="source", focus="Focus", pairs="QAPairs", pair="QAPair", question="Question",
                     answer="Answer"),
    "DiseaseFile": dict(source="source", focus="Focus", pairs="QAPairs", pair="QAPair", question="Question",
                        answer="Answer"),
    "doc": dict(source="corpus", focus="doctitle-focus", pairs="qaPairs", pair="pair", question="question",
                answer="answer"),
}


def record_id(relpath: str, pid: str) -> str:
    """Collection folder + file stem + pid: upstream qids and even Document ids collide across files."""
    path = PurePosixPath(relpath)
    return f"{path.parent.as_posix()}/{path.stem}-{pid}"


def parse_document(data: bytes, relpath: str) -> list[dict]:
    """Every QA pair of one MedQuAD XML file, unanswered ones included, in file order.

    `relpath` ("2_GARD_QA/0000001.xml") names the file in errors and builds the ids.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise MalformedFileError(relpath, f"not well-formed XML ({err})") from None
    schema = _SCHEMAS.get(root.tag)
    if schema is None:
        raise MalformedFileError(relpath, f"unknown root element <{root.tag}> (expected one of {', '.join(_SCHEMAS)})")

    source = (root.get(schema["source"]) or "").strip()
    url = (root.get("url") or "").strip()
    focus = _text(root.find(schema["focus"]))
    pairs = root.find(schema["pairs"])
    if pairs is None:
        raise MalformedFileError(relpath, f"no <{schema['pairs']}> element")

    records, seen = [], set()
    for pair in pairs.findall(schema["pair"]):
        pid = (pair.get("pid") or "").strip()
        question = pair.find(schema["question"])
        answer = pair.find(schema["answer"])
        if not pid:
            raise MalformedFileError(relpath, f"<{schema['pair']}> without a pid")
        if pid in seen:
            raise MalformedFileError(relpath, f"pid {pid} appears twice")
        if question is None or answer is None:
            raise MalformedFileError(relpath, f"pair {pid} lacks <{schema['question']}> or <{schema['answer']}>")
        qtype = question.get("qtype")
        if not qtype:
            raise MalformedFileError(relpath, f"pair {pid} has no qtype")
        seen.add(pid)
        records.append({
            "id": record_id(relpath, pid),
            "question": _text(question),
            "answer": _text(answer),
            "qtype": qtype.strip(),
            "source": source,
            "focus": focus,
            "url": url,
        })
    return records


def _text(element) -> str:
    # itertext, not .text: a stray child element must not silently truncate an answer
    return "".join(element.itertext()).strip() if element is not None else ""


def records_from_table(rows: list[dict], columns: dict, name: str) -> list[dict]:
    """Rows of a CSV/JSONL/Parquet export -> records, using the params column mapping.

    Columns mapped to null get "" (qtype "unknown", source = the table's name) so every record has every field.
    """
    missing = sorted({col for col in columns.values() if col} - set(rows[0])) if rows else []
    if missing:
        have = ", ".join(map(str, rows[0]))
        raise MalformedFileError(name, f"column(s) {', '.join(missing)} not found (has: {have}); fix data.columns")
    defaults = {"qtype": "unknown", "source": PurePosixPath(name).stem, "focus": "", "url": ""}
    records = []
    for index, row in enumerate(rows):
        record = {"id": f"{PurePosixPath(name).stem}-{index}"}
        for field in RECORD_FIELDS[1:]:
            column = columns.get(field)
            value = row.get(column) if column else None
            record[field] = defaults.get(field, "") if _is_missing(value) else str(value).strip()
        records.append(record)
    return records


ALPACA_KEYS = ("instruction", "input", "output")


def records_from_alpaca(data: bytes, name: str) -> list[dict]:
    """Alpaca-style JSON (a list of {instruction, input, output}) -> records: question = input, answer = output.

    WikiDoc's instruction is the same line for every record ("Answer this question truthfully"), so it is not part
    of the question. A record without the keys, or text that is not a JSON list of objects, is refused by index.
    """
    import json

    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedFileError(name, f"not valid JSON ({err})") from None
    if not isinstance(rows, list):
        raise MalformedFileError(name, f"expected a JSON list of {{{', '.join(ALPACA_KEYS)}}} records, "
                                       f"got {type(rows).__name__}")
    records = []
    for index, row in enumerate(rows):
        missing = [k for k in ALPACA_KEYS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise MalformedFileError(name, f"record {index} lacks text field(s) {', '.join(missing)}")
        records.append({"id": str(index), "question": row["input"].strip(), "answer": row["output"].strip(),
                        "qtype": "", "source": "", "focus": "", "url": ""})
    return records


def _is_missing(value) -> bool:
    # pandas gives NaN (a float unequal to itself) for empty cells
    return value is None or (isinstance(value, float) and value != value)


def read_table(path) -> list[dict]:
    """Rows of a CSV, JSONL, Parquet or Excel (.xlsx) file (empty cells become None/NaN)."""
    import pandas as pd

    readers = {
        # keep_default_na=False: a cell reading "NA" or "None" is text, not a missing value
        ".csv": lambda: pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]),
        ".jsonl": lambda: pd.read_json(path, lines=True, dtype=False),
        ".json": lambda: pd.read_json(path, dtype=False),
        ".parquet": lambda: pd.read_parquet(path),
        # the first sheet; openpyxl reads it (pandas needs it for .xlsx)
        ".xlsx": lambda: pd.read_excel(path, dtype=str, keep_default_na=False, na_values=[""], engine="openpyxl"),
    }
    read = readers.get(PurePosixPath(str(path)).suffix.lower())
    if read is None:
        raise MalformedFileError(str(path), f"unsupported table format (use {', '.join(readers)})")
    try:
        frame = read()
    # pandas/pyarrow parse errors are ValueErrors; openpyxl raises BadZipFile (not a zip) or KeyError (no sheet xml)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise MalformedFileError(str(path), f"cannot be read as a table ({err})") from None
    return frame.to_dict(orient="records")


def parse_collection(root, skip_malformed: bool) -> tuple[list[dict], list[dict], int]:
    """Parse every XML file under root/<collection>/ in sorted path order.

    Returns (records, skipped, files_parsed); `skipped` names each malformed file and why. Without skip_malformed
    the first malformed file raises.
    """
    records, skipped, files = [], [], 0
    for path in sorted(p for p in root.glob("*/*.xml") if p.is_file()):
        relpath = path.relative_to(root).as_posix()
        files += 1
        try:
            records.extend(parse_document(path.read_bytes(), relpath))
        except MalformedFileError as err:
            if not skip_malformed:
                raise
            skipped.append({"file": relpath, "reason": err.reason})
    return records, skipped, files


def clean_records(records: list[dict], params) -> tuple[list[dict], dict]:
    """Normalize, filter and de-duplicate; returns (kept, counts) with every dropped record counted by reason.

    `params` is a PrepareParams. Reasons are checked in a fixed order and each record counts once, under the first
    reason that applies.
    """
    wanted = set(params.qtypes)
    seen_pairs: set[tuple[str, str]] = set()
    kept: list[dict] = []
    dropped = {reason: 0 for reason in DROP_REASONS}
    per_qtype: dict[str, dict] = {}
    per_source: dict[str, dict] = {}
    for record in records:
        question = normalize_question(record["question"])
        answer = normalize_answer(record["answer"])
        for tally in (_tally(per_qtype, record["qtype"]), _tally(per_source, record["source"])):
            tally["in"] += 1
        if not answer:
            reason = "no_answer"
        elif wanted and record["qtype"] not in wanted:
            reason = "qtype_excluded"
        elif len(question) < params.min_question_chars:
            reason = "question_too_short"
        elif len(question) > params.max_question_chars:
            reason = "question_too_long"
        elif len(answer) < params.min_answer_chars:
            reason = "answer_too_short"
        elif len(answer) > params.max_answer_chars:
            reason = "answer_too_long"
        elif params.dedupe == "exact" and (question, answer) in seen_pairs:
            reason = "duplicate"
        else:
            reason = None
        if reason:
            dropped[reason] += 1
            continue
        seen_pairs.add((question, answer))
        kept.append({**record, "question": question, "answer": answer, "focus": " ".join(record["focus"].split())})
        per_qtype[record["qtype"]]["kept"] += 1
        per_source[record["source"]]["kept"] += 1
    counts = {
        "in": len(records),
        "answered": len(records) - dropped["no_answer"],
        "kept": len(kept),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "per_qtype": dict(sorted(per_qtype.items())),
        "per_source": dict(sorted(per_source.items())),
        "qtypes_not_found": sorted(wanted - set(per_qtype)),
    }
    return kept, counts


def _tally(table: dict, key: str) -> dict:
    return table.setdefault(key, {"in": 0, "kept": 0})
