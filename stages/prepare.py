"""Stage prepare: parse data/raw (MedQuAD XML or a table, plus data.extra), normalize, filter, de-duplicate -> qa.jsonl.

One record per answered pair: id (collection/file-pid for MedQuAD, <dataset>/<row> else, globally unique), question,
answer, qtype, source, focus, url, dataset. Every dropped record is counted by reason in the report; records of an
added dataset that duplicate an earlier dataset's question or answer (exactly or nearly) are counted per pair.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import ConfigError, load_params
from stages.lib.io import atomic_dir, read_json, run_metadata, setup_logging, write_json, write_jsonl
from stages.lib.data.medquad import MalformedFileError, parse_collection, read_table, records_from_table
from stages.lib.data.merge import merge_datasets, parse_extra
from stages.lib.versions import check_versions

logger = logging.getLogger("stages.prepare")

PARAMS = ("data", "prepare")
LIBRARIES = ("pandas",)
EXTRA_LIBRARIES = ("openpyxl", "datasketch")  # an .xlsx table; near-duplicates across datasets

# A handful of bad files is survivable with skip_malformed; more than this share means a wrong source or a
# parser that no longer matches the data, and silently training on the remainder would hide it.
MAX_SKIPPED_FRACTION = 0.1


class PrepareError(ValueError):
    """The raw data cannot become a usable QA set."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, help="output folder of the download stage")
    parser.add_argument("--out", required=True, help="output folder; gets qa.jsonl")
    parser.add_argument("--report", required=True, help="JSON report (a DVC metric)")
    return parser


def load_records(raw: Path, data, skip_malformed: bool) -> tuple[list[dict], list[dict], int]:
    """(records, skipped files, files read) from whatever the download stage wrote."""
    manifest = read_json(raw / "manifest.json") if (raw / "manifest.json").is_file() else {}
    if manifest.get("format") != data.format:
        raise PrepareError(f"{raw} holds format {manifest.get('format')!r} but data.format is {data.format!r}; "
                           "rerun the download stage")
    if data.format == "table":
        table = raw / manifest["table"]
        return records_from_table(read_table(table), data.columns, table.name), [], 1
    records, skipped, files = parse_collection(raw / "medquad", skip_malformed)
    for item in skipped:
        logger.warning("skipped malformed file %s: %s", item["file"], item["reason"])
    if files == 0:
        raise PrepareError(f"no XML files under {raw / 'medquad'}")
    if len(skipped) > MAX_SKIPPED_FRACTION * files:
        raise PrepareError(f"{len(skipped)} of {files} files are malformed (more than {MAX_SKIPPED_FRACTION:.0%}); "
                           f"first: {skipped[0]['file']}: {skipped[0]['reason']}")
    return records, skipped, files


def fetched_extras(raw: Path) -> dict[str, dict]:
    """What the download stage recorded of each added dataset (file, licence, pinned upstream)."""
    return (read_json(raw / "manifest.json") if (raw / "manifest.json").is_file() else {}).get("extra", {})


def load_extras(raw: Path, data) -> list[tuple[str, dict, list[dict]]]:
    """(name, entry, records) of each data.extra dataset, from raw/extra/<name>/<file> as download left it."""
    fetched = fetched_extras(raw)
    extras = []
    for name, entry in data.extra_entries():
        if fetched.get(name, {}).get("file") != entry["file"]:
            raise PrepareError(f"{raw} holds no {entry['file']} for dataset {name}; rerun the download stage")
        path = raw / "extra" / name / entry["file"]
        content = path.read_bytes() if entry["format"] == "alpaca" else read_table(path)
        extras.append((name, entry, parse_extra(name, entry, content, f"{name}/{entry['file']}")))
    return extras


def main(args: argparse.Namespace) -> int:
    check_versions(LIBRARIES)
    try:
        params = load_params(args.params, PARAMS)
        data, prep = params["data"], params["prepare"]
        if data.extra:
            check_versions(EXTRA_LIBRARIES)
        records, skipped, files = load_records(Path(args.raw), data, prep.skip_malformed)
        kept, merged = merge_datasets(records, load_extras(Path(args.raw), data), prep)
        counts = merged.pop("medquad")
        empty = [name for name in data.extra if merged["datasets"][name]["kept"] == 0]
        if empty:  # a dataset named in data.extra that contributes nothing is a mistake, not a merge
            raise PrepareError(f"data.extra dataset(s) {', '.join(empty)} keep no record after filters, dedup and "
                               f"cap ({merged['datasets'][empty[0]]}); loosen the prepare params or drop them")
        if not kept:
            raise PrepareError(f"nothing left after filtering {len(records)} records: {counts['dropped_by_reason']}; "
                               "loosen the prepare params (qtypes, min/max lengths)")
        ids = [r["id"] for r in kept]
        if len(set(ids)) != len(ids):
            raise PrepareError("record ids are not unique")
    except (ConfigError, MalformedFileError, PrepareError) as err:
        logger.error("%s", err)
        return 1
    for qtype in counts["qtypes_not_found"]:
        logger.warning("prepare.qtypes lists %r, which no record has", qtype)

    with atomic_dir(args.out) as tmp:
        write_jsonl(tmp / "qa.jsonl", kept)
    for name, provenance in fetched_extras(Path(args.raw)).items():
        if name in merged["datasets"]:  # licence and pinned upstream first: they travel with the data
            merged["datasets"][name] = {"licence": provenance["licence"], "upstream": provenance["upstream"],
                                        **merged["datasets"][name]}
    write_json(args.report, {"files_parsed": files, "files_skipped": len(skipped), "skipped": skipped,
                             **counts, "kept_all_datasets": len(kept), **merged, "run": run_metadata()})
    logger.info("kept %d of %d MedQuAD records; dropped %s", counts["kept"], counts["in"], counts["dropped_by_reason"])
    for name, row in merged["datasets"].items():
        logger.info("dataset %s: %d in, %d kept", name, row["in"], row["kept"])
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
