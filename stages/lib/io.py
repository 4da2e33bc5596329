"""Small I/O helpers shared by every stage: whole-or-nothing writes, JSONL, run metadata, logging."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries whose versions every report records (those not installed are listed as null).
TRACKED_LIBRARIES = (
    "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
    "dvc", "dvclive", "evaluate", "rouge-score", "sacrebleu", "bert-score", "pandas", "gguf",
)


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=level or os.environ.get("LOG_LEVEL", "INFO"), format=LOG_FORMAT, stream=sys.stderr)


def setup_quiet_logging(log_file: str | Path, verbose: bool = False) -> None:
    """For the interactive tools (`ask`, the demo): every log line, library warning and loading progress bar goes
    to `log_file`; the person at the keyboard sees only errors, as one plain line each (all of it with `verbose`).

    transformers logs through a handler of its own and shows its own progress bars, so both are redirected here.
    """
    import warnings

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_screen = logging.StreamHandler(sys.stderr)
    to_screen.setLevel(logging.INFO if verbose else logging.ERROR)
    to_screen.setFormatter(logging.Formatter(LOG_FORMAT if verbose else "error: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_screen], force=True)
    logging.captureWarnings(True)  # FutureWarnings and the like become log records (file only unless verbose)
    warnings.simplefilter("default")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()
    if not verbose:
        hf_logging.disable_progress_bar()


log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"  # temp names beside an output: .<name>.tmp-<random>; nothing reads them as the output


def _remove_stale_temps(target: Path) -> None:
    """Temps beside `target` that a killed write left (a crash cannot clean up after itself): they are never read
    as the output, but an unfinished model folder can hold gigabytes."""
    for stale in target.parent.glob(f".{target.name}{TMP_TAG}*"):
        log.warning("removing %s, left by an unfinished write of %s", stale, target)
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


def write_failure(target: Path, err: OSError) -> OSError:
    """The error for a write of `target` that the system refused (full disk, permissions...): names the output and
    the cause, with the free space when the disk is full. Nested writes keep the innermost cause."""
    reason = getattr(err, "write_reason", None)
    if reason is None:
        reason = f"{err.strerror}: {err.filename}" if err.filename else err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(next(p for p in target.parents if p.exists())).free
                reason += f" ({free / 2**20:.0f} MiB free on that disk)"
    failure = OSError(err.errno, f"cannot write {target}: {reason}; nothing was written there (any previous "
                                 "version is kept)")  # OSError(errno, ...) is the errno's subclass, as `err` was
    failure.write_reason = reason
    return failure


def _refused(err: BaseException) -> bool:
    """The system refused a write (an errno: full disk, permissions...), rather than our code raising."""
    return isinstance(err, OSError) and err.errno is not None


def _note_untouched(target: Path, err: BaseException) -> None:
    if isinstance(err, Exception):  # not on a KeyboardInterrupt
        err.add_note(f"nothing was written to {target} (any previous version is kept)")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on error it is removed and `target` is
    left as it was. A kill at any point leaves the old `target` (or none) plus a temp the next write removes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes owner-only folders; outputs are shared artefacts
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _refused(err):
            raise write_failure(target, err) from err
        _note_untouched(target, err)
        raise
    # the old version is renamed away first, so a kill never leaves a half-deleted `target`
    old = tmp.with_name(tmp.name + "-old") if target.exists() or target.is_symlink() else None
    if old is not None:
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Open a temp file beside `target` and rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _refused(err):
            raise write_failure(target, err) from err
        _note_untouched(target, err)
        raise


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed; a progress bar for the big ones (weights are hundreds of MB to GBs)."""
    from tqdm.auto import tqdm

    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                      disable=size < 64 << 20, leave=False) as bar:
        while block := fh.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions(names: Iterable[str] = TRACKED_LIBRARIES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_metadata() -> dict:
    """What every report records so a number can be traced to code, libraries and machine."""
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
    }
