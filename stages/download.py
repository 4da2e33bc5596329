"""Stage download: fetch MedQuAD (or a table export of it), keep the dataset files, verify them, write data/raw.

The source is params data.source unless MEDQUAD_SOURCE is set: an http(s) archive URL, a local folder, .zip or
.tar.gz, hf://<dataset id> (format: table), or a CSV/JSONL/Parquet file (format: table). Whichever way the data
arrives, the kept MedQuAD files must match the committed per-file sha256 manifest, so the output is the same.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import ConfigError, load_params
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
            write_json(work / "manifest.json", {"format": data.format, **info})
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
        "run": run_metadata(),
    }
    write_json(args.report, report)
    logger.info("kept %d files (%d bytes), skipped %s", report["files_kept"], report["bytes"], report["skipped"])
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
