"""Regenerate stages/lib/data/medquad_manifest.json: the sha256 of every file the download stage keeps.

    python -m tools.make_manifest --root ../shared/medquad --out stages/lib/data/medquad_manifest.json

Run it only when moving to a new upstream commit (then update data.source too); the download stage refuses any
file that does not match. Files outside the 12 collection folders, readme.txt and LICENSE.txt (e.g. our
DATASET.md, upstream's LiveQA zip) are not part of the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stages.lib.data.fetch import build_manifest, find_dataset_root
from stages.lib.io import atomic_file, setup_logging

UPSTREAM = {"repository": "https://github.com/abachaa/MedQuAD", "commit": "577bd37b96c02d1833b2c9eed2de9f96964e96cb"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/medquad", help="a MedQuAD folder (top folder optional)")
    parser.add_argument("--out", default="stages/lib/data/medquad_manifest.json")
    parser.add_argument("--commit", default=UPSTREAM["commit"], help="upstream commit these files come from")
    return parser


def write_manifest(files: dict[str, str], out: Path, upstream: dict) -> None:
    doc = {"dataset": "MedQuAD", "upstream": upstream, "algorithm": "sha256", "count": len(files), "files": files}
    with atomic_file(out) as fh:
        # one file a line keeps git diffs of a dataset update readable
        fh.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def main(args: argparse.Namespace) -> int:
    files = build_manifest(find_dataset_root(Path(args.root)))
    write_manifest(files, Path(args.out), {**UPSTREAM, "commit": args.commit})
    logging.getLogger("make_manifest").info("wrote %d checksums to %s", len(files), args.out)
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
