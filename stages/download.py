"""Stage download: fetch MedQuAD (or a table export of it), keep the dataset files, verify them, write data/raw.

The source is params data.source unless MEDQUAD_SOURCE is set: an http(s) archive URL, a local folder, .zip or
.tar.gz, hf://<dataset id> (format: table), or a CSV/JSONL/Parquet file (format: table). Whichever way the data
arrives, the kept MedQuAD files must match the committed per-file sha256 manifest, so the output is the same.

Each data.extra dataset (WikiDoc, MedicationQA) comes from its upstream pinned in datasets_manifest.json, or from
MEDQA_DATASETS_DIR/<dataset>/ (offline machines, CI), verified file by file like the multiple-choice suites, into
data/raw/extra/<name>/; its licence and pinned upstream go into data/raw/manifest.json for the prepare stage.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import ConfigError, load_params
from stages.lib.data.datasets import ENV_VAR as DATASETS_ENV_VAR
from stages.lib.data.datasets import DatasetError, check_manifest, fetch_dataset, resolve_local_root
from stages.lib.data.fetch import (HINT, FetchError, classify_source, fetch_medquad, fetch_table, resolve_source,
                              sha256_file)
from stages.lib.io import atomic_dir, read_json, run_metadata, setup_logging, write_json
from stages.lib.versions import check_versions

logger = logging.getLogger("stages.download")

# Exactly the params groups dvc.yaml lists for this stage.
PARAMS = ("data",)
LIBRARIES = ("datasets", "huggingface-hub", "tqdm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--manifest", required=True, help="committed per-file sha256 manifest of MedQuAD")
    parser.add_argument("--datasets-manifest", required=True,
                        help="committed per-dataset sha256 manifest of the data.extra datasets")
    parser.add_argument("--out", required=True, help="output folder (replaced whole, or left untouched on error)")
    parser.add_argument("--report", required=True, help="JSON report (a DVC metric)")
    return parser


def load_manifest(path: Path) -> dict[str, str]:
    try:
        files = read_json(path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FetchError(f"cannot read the checksum manifest {path}: {err!r}") from None
    if not files:
        raise FetchError(f"the checksum manifest {path} lists no files")
    return files


def fetch_extras(data, manifest: dict, work: Path) -> tuple[dict, dict]:
    """Fetch and verify each data.extra dataset into work/extra/<name>; returns (for data/raw/manifest.json,
    provenance for the report). Unknown manifest entries and files it does not list are refused first."""
    entries = data.extra_entries()
    check_manifest(manifest, [entry["manifest"] for _, entry in entries])
    for name, entry in entries:
        if entry["file"] not in manifest[entry["manifest"]]["files"]:
            raise DatasetError(f"data.datasets.{name}.file {entry['file']!r} is not a file of {entry['manifest']} "
                               f"(has: {', '.join(manifest[entry['manifest']]['files'])})")
    local = resolve_local_root()
    kept, provenance = {}, {}
    for name, entry in entries:
        pinned = manifest[entry["manifest"]]
        provenance[name] = fetch_dataset(entry["manifest"], pinned, work / "extra" / name, local)
        up = pinned["upstream"]
        upstream = (f"github:{up['repo']}@{up['commit']}/{up.get('prefix', '')}{entry['file']}"
                    if up["kind"] == "github" else f"pypi:{up['requirement']}")
        # no local path or time here: the folder is cached and must be the same bytes wherever it was fetched
        kept[name] = {"manifest": entry["manifest"], "file": entry["file"], "licence": pinned.get("licence", ""),
                      "upstream": upstream, "what": pinned.get("what", "")}
    return kept, provenance


def main(args: argparse.Namespace) -> int:
    check_versions(LIBRARIES)
    try:
        data = load_params(args.params, PARAMS)["data"]
    except ConfigError as err:
        logger.error("%s", err)
        return 1
    source, origin = resolve_source(data.source)
    set_by = "MEDQUAD_SOURCE" if origin == "env" else "params data.source"
    logger.info("source (from %s): %s, format %s", set_by, source, data.format)
    try:
        kind = classify_source(source)
        with atomic_dir(args.out) as work:
            if data.format == "medquad":
                info = fetch_medquad(source, kind, work, load_manifest(Path(args.manifest)))
            else:
                info = fetch_table(source, kind, data.revision, work)
            extra, extra_provenance = {}, {}
            if data.extra:
                try:
                    extra, extra_provenance = fetch_extras(data, read_json(args.datasets_manifest), work)
                except (DatasetError, OSError) as err:
                    raise DatasetError(f"{err}\nSet {DATASETS_ENV_VAR} to a local copy (one folder per dataset, "
                                       "e.g. ../shared/datasets) on an offline machine.") from None
            write_json(work / "manifest.json", {"format": data.format, **info, **({"extra": extra} if extra else {})})
    except DatasetError as err:
        logger.error("cannot get the data.extra datasets: %s", err)
        return 1
    except (FetchError, OSError) as err:  # OSError: e.g. an unreadable file in a local source folder
        logger.error("cannot get MedQuAD from %s (set by %s): %s\n%s", source, set_by, err, HINT)
        return 1

    report = {
        "source": source,
        "source_origin": origin,
        "source_kind": kind,
        "format": data.format,
        "revision": data.revision if kind == "hf" else None,
        "files_kept": len(info["files"]),
        "files_skipped": len(info.get("skipped", [])),
        "skipped": info.get("skipped", []),
        "per_collection": info.get("per_collection", {}),
        "bytes": info["bytes"],
        "manifest_sha256": sha256_file(Path(args.manifest)) if data.format == "medquad" else None,
        "extra": {name: {**extra[name], **extra_provenance[name]} for name in extra},
        "run": run_metadata(),
    }
    write_json(args.report, report)
    logger.info("kept %d files (%d bytes), skipped %s", report["files_kept"], report["bytes"], report["skipped"])
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
