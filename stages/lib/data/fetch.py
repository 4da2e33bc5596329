"""Getting MedQuAD onto disk: source resolution, http download, safe archive extraction, layout and checksum checks.

Everything is written under a caller-given work folder (the download stage's temp output), so a failure anywhere
leaves nothing behind and nothing is ever written outside it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from stages.lib.io import sha256_file

logger = logging.getLogger(__name__)

# The dataset proper. Upstream also ships a LiveQA relevance-judgment zip at the top level; it is not a QA
# collection and is skipped, as is anything else found beside these.
COLLECTIONS = (
    "1_CancerGov_QA", "2_GARD_QA", "3_GHR_QA", "4_MPlus_Health_Topics_QA", "5_NIDDK_QA", "6_NINDS_QA",
    "7_SeniorHealth_QA", "8_NHLBI_QA_XML", "9_CDC_QA", "10_MPlus_ADAM_QA", "11_MPlusDrugs_QA",
    "12_MPlusHerbsSupplements_QA",
)
TOP_FILES = ("readme.txt", "LICENSE.txt")
TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
ENV_VAR = "MEDQUAD_SOURCE"
HINT = (f"Set {ENV_VAR} to a local copy (a MedQuAD folder, .zip or .tar.gz; for data.format: table a "
        f".csv/.jsonl/.parquet file), e.g. `{ENV_VAR}=../shared/medquad dvc repro`, or fix data.source in params.yaml.")
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """The source cannot be fetched, extracted or verified."""


def resolve_source(configured: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(source, origin): the MEDQUAD_SOURCE env var wins over params so offline machines need no params edit."""
    override = (env.get(ENV_VAR) or "").strip()
    return (override, "env") if override else (configured, "params")


def classify_source(source: str) -> str:
    """url | hf | dir | file. Local paths must exist; archive vs table is decided later by content."""
    if source.startswith(("http://", "https://")):
        return "url"
    if source.startswith("hf://"):
        return "hf"
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir"
    if path.is_file():
        return "file"
    raise FetchError(f"path does not exist: {path}")


# ---------------------------------------------------------------- download


def download_url(url: str, dest: Path, timeout: float = 60) -> Path:
    """Stream `url` into `dest` with a progress bar."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "medquad-dvc-pipeline"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {posixpath.basename(url)[:40]}",
                      mininterval=1) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError and timeouts are OSErrors
        raise FetchError(f"cannot download {url}: {err}") from None
    return dest


# ---------------------------------------------------------------- archives


def archive_kind(path: Path) -> str:
    """zip | tar, from the file's first bytes (URLs and file names may lie)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    raise FetchError(f"{path.name} is not a zip or tar(.gz) archive (unrecognised content)")


def member_parts(name: str) -> list[str]:
    """Path components of an archive member, or FetchError if it would land outside the extraction folder."""
    norm = name.replace("\\", "/")  # Windows-made archives may use backslashes; treat them as separators
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise FetchError(f"unsafe archive: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"unsafe archive: member {name!r} contains '..'; refusing to write outside the output")
    return parts


def check_link(name: str, target: str, hard: bool = False) -> None:
    """Reject a link whose target resolves outside the archive root."""
    # symlink targets are relative to the link's folder; hard-link targets to the archive root
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    target = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or (len(target) > 1 and target[1] == ":") or resolved.split("/")[0] == "..":
        raise FetchError(f"unsafe archive: link {name!r} -> {target!r} points outside the archive; refusing to extract")


def safe_extract(archive: Path, dest: Path) -> dict:
    """Extract regular files and folders of a zip/tar into `dest`; returns counts.

    Every member is checked before it is written (absolute paths, '..', links leaving the tree, device files are
    errors). Links that stay inside are checked but not materialised: MedQuAD has none, and a kept file that was a
    link then shows up as missing in the manifest check instead of being silently resolved.
    """
    kind = archive_kind(archive)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        counts = _extract_zip(archive, dest) if kind == "zip" else _extract_tar(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as err:
        raise FetchError(f"corrupt {kind} archive {archive.name}: {err}") from None
    if counts["links_skipped"]:
        logger.warning("%d link(s) inside %s were not extracted", counts["links_skipped"], archive.name)
    return counts


def _target(dest: Path, parts: list[str]) -> Path:
    target = dest.joinpath(*parts)
    # belt and braces: a folder extracted earlier could never be a symlink (we never create any), but check anyway
    if not target.resolve().is_relative_to(dest.resolve()):
        raise FetchError(f"unsafe archive: {'/'.join(parts)!r} resolves outside the output; refusing to extract")
    return target


def _extract_zip(archive: Path, dest: Path) -> dict:
    counts = {"files": 0, "links_skipped": 0}
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = member_parts(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                check_link(info.filename, zf.read(info).decode("utf-8", "replace"))
                counts["links_skipped"] += 1
                continue
            _write_member(dest, parts, info.is_dir(), lambda: zf.open(info), counts)
    return counts


def _write_member(dest: Path, parts: list[str], is_dir: bool, open_src, counts: dict) -> None:
    """Write one already-checked archive member under `dest` (both archive formats end here)."""
    if not parts:
        return
    target = _target(dest, parts)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_src() as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
    counts["files"] += 1


def _extract_tar(archive: Path, dest: Path) -> dict:
    counts = {"files": 0, "links_skipped": 0}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # sequential: each member is checked, then written, in one pass over the stream
            parts = member_parts(member.name)
            if member.issym() or member.islnk():
                check_link(member.name, member.linkname, hard=member.islnk())
                counts["links_skipped"] += 1
                continue
            if not (member.isfile() or member.isdir()):
                raise FetchError(f"unsafe archive: member {member.name!r} is a device or fifo; refusing to extract")
            _write_member(dest, parts, member.isdir(), lambda: tar.extractfile(member), counts)
    return counts


# ---------------------------------------------------------------- layout and checksums


def find_dataset_root(tree: Path) -> Path:
    """The folder holding the collection folders: `tree` itself or its single top folder (GitHub archives)."""
    for candidate in (tree, *_single_subfolder(tree)):
        if any((candidate / name).is_dir() for name in COLLECTIONS):
            return candidate
    raise FetchError(f"no MedQuAD collection folder (e.g. {COLLECTIONS[0]}) found at the top of the source "
                     "or inside its single top folder")


def _single_subfolder(tree: Path) -> list[Path]:
    entries = [p for p in tree.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    return entries if len(entries) == 1 and entries[0].is_dir() else []


def list_dataset_files(root: Path) -> tuple[list[str], list[str]]:
    """(kept, skipped): kept = every file under the 12 collection folders + the top files, as sorted relative paths.

    Raises when a collection folder or top file is missing; skipped = other top-level entries, by name.
    """
    missing = [name for name in COLLECTIONS if not (root / name).is_dir()]
    missing += [name for name in TOP_FILES if not (root / name).is_file()]
    if missing:
        raise FetchError(f"not a MedQuAD layout: missing {', '.join(missing)}")
    kept = list(TOP_FILES)
    for name in COLLECTIONS:
        kept += [p.relative_to(root).as_posix() for p in (root / name).rglob("*") if not p.is_dir()]
    skipped = sorted(p.name for p in root.iterdir() if p.name not in COLLECTIONS and p.name not in TOP_FILES)
    return sorted(kept), skipped


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of the files the download stage keeps from a MedQuAD tree at `root`."""
    kept, _ = list_dataset_files(root)
    return {rel: sha256_file(root / rel) for rel in kept}


def compare_manifest(actual: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Human-readable problems (missing, unexpected, changed files); empty when the two match."""
    problems = []
    for label, names in (
        ("missing", sorted(set(expected) - set(actual))),
        ("unexpected", sorted(set(actual) - set(expected))),
        ("checksum mismatch", sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])),
    ):
        if names:
            shown = ", ".join(names[:5]) + (f" ... (+{len(names) - 5} more)" if len(names) > 5 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    return problems


def copy_dataset(root: Path, out: Path, expected: dict[str, str]) -> dict:
    """Copy the kept files of the MedQuAD tree at `root` into `out`, verifying each against `expected`."""
    kept, skipped = list_dataset_files(root)
    actual = {}
    for rel in kept:
        data = (root / rel).read_bytes()
        actual[rel] = sha256_bytes(data)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    problems = compare_manifest(actual, expected)
    if problems:
        raise FetchError("files do not match the committed manifest: " + "; ".join(problems))
    per_collection = {name: sum(1 for rel in kept if rel.startswith(name + "/")) for name in COLLECTIONS}
    return {"files": actual, "skipped": skipped, "per_collection": per_collection,
            "bytes": sum((out / rel).stat().st_size for rel in kept)}


# ---------------------------------------------------------------- Hugging Face Hub


def load_hub_dataset(dataset_id: str, revision: str):
    """All splits of a Hub dataset at a pinned revision, concatenated in split-name order, plus the split names."""
    from datasets import concatenate_datasets, load_dataset

    try:
        # cache_dir read here, not at datasets' import time, so HF_DATASETS_CACHE set late still counts
        loaded = load_dataset(dataset_id, revision=revision, cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    except Exception as err:  # datasets raises a zoo of types (connection, not found, auth, format); all are fatal
        raise FetchError(f"cannot load Hugging Face dataset {dataset_id!r} at revision {revision!r}: {err}") from err
    names = sorted(loaded)
    return concatenate_datasets([loaded[name] for name in names]), names


# ---------------------------------------------------------------- whole fetches


def fetch_medquad(source: str, kind: str, work: Path, expected: dict[str, str]) -> dict:
    """Put the verified MedQuAD tree at work/medquad; scratch files live in work/.staging and are removed."""
    staging = work / ".staging"
    if kind == "hf":
        raise FetchError("hf:// sources are tables: set data.format: table and data.columns in params.yaml")
    if kind == "dir":
        tree = Path(source).expanduser()
    else:
        archive = download_url(source, staging / "archive") if kind == "url" else Path(source).expanduser()
        tree = staging / "tree"
        counts = safe_extract(archive, tree)
        logger.info("extracted %d files from %s", counts["files"], archive.name)
    info = copy_dataset(find_dataset_root(tree), work / "medquad", expected)
    shutil.rmtree(staging, ignore_errors=True)
    return info


def fetch_table(source: str, kind: str, revision: str | None, work: Path) -> dict:
    """Put the table at work/table.<ext> (Hub datasets become Parquet)."""
    if kind == "hf":
        if not revision:
            raise FetchError("hf:// sources need data.revision pinned to a commit, so reruns fetch the same rows")
        dataset, splits = load_hub_dataset(source.removeprefix("hf://"), revision)
        target = work / "table.parquet"
        dataset.to_parquet(str(target))
        info = {"splits": splits, "rows": len(dataset)}
    elif kind in ("url", "file"):
        suffix = Path(urlparse(source).path if kind == "url" else source).suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise FetchError(f"a table source must end in one of {', '.join(TABLE_SUFFIXES)}, "
                             f"got {suffix or 'no suffix'!r}")
        target = work / f"table{suffix}"
        if kind == "url":
            download_url(source, target)
        else:
            shutil.copyfile(Path(source).expanduser(), target)
        info = {}
    else:
        raise FetchError("data.format: table needs a .csv/.jsonl/.parquet file, a URL to one, or hf://<dataset id>")
    return {**info, "table": target.name, "files": {target.name: sha256_file(target)}, "bytes": target.stat().st_size}
