"""stages/lib/io.py: every stage output is written whole or not at all, under the faults that break writes: a full
disk mid-file, a process killed mid-write, an error inside the writing block."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT

from stages.lib import io


class FullDiskAfter:
    """A file object that takes `room` bytes, then fails the way write(2) does on a full disk."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(data[:self.room])
            self.fh.flush()  # the part that fit is on disk, as after a real ENOSPC
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """Writes through stages.lib.io's temp files fail after 10 bytes with ENOSPC."""
    real = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda *a, **k: FullDiskAfter(real(*a, **k), room=10))


def temps_beside(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}{io.TMP_TAG}"))


def test_full_disk_mid_file_keeps_the_old_file_and_names_path_and_cause(tmp_path, full_disk):
    target = tmp_path / "reports" / "metrics.json"
    target.parent.mkdir()
    target.write_text('{"old": 1}\n')
    with pytest.raises(OSError) as caught:
        io.write_json(target, {"rows": list(range(100))})
    err = caught.value
    assert err.errno == errno.ENOSPC
    assert str(err).startswith(f"[Errno {errno.ENOSPC}] cannot write {target}: No space left on device (")
    assert "MiB free on that disk" in str(err) and "nothing was written there" in str(err)
    assert target.read_text() == '{"old": 1}\n'  # the previous version, whole
    assert temps_beside(target) == []  # and no half-written temp


def test_full_disk_inside_an_output_folder_names_the_folder(tmp_path, full_disk):
    """A folder output (data/prepared, models/adapter) whose inner write fails: the error names the output, the
    folder stays as it was."""
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "qa.jsonl").write_text("old\n")
    with pytest.raises(OSError) as caught:
        with io.atomic_dir(out) as tmp:
            io.write_jsonl(tmp / "qa.jsonl", ({"i": i} for i in range(100)))
    assert str(caught.value).startswith(f"[Errno {errno.ENOSPC}] cannot write {out}: No space left on device (")
    assert sorted(p.name for p in out.iterdir()) == ["qa.jsonl"] and (out / "qa.jsonl").read_text() == "old\n"
    assert temps_beside(out) == []


def test_our_own_errors_keep_their_type_and_say_nothing_was_written(tmp_path):
    out = tmp_path / "split"
    with pytest.raises(ValueError, match="empty split") as caught:
        with io.atomic_dir(out) as tmp:
            (tmp / "train.jsonl").write_text("{}\n")
            raise ValueError("empty split")
    assert caught.value.__notes__ == [f"nothing was written to {out} (any previous version is kept)"]
    assert not out.exists() and temps_beside(out) == []


KILLED_WRITER = """
import os, signal, sys
from stages.lib import io
target = sys.argv[1]
with io.atomic_{kind}(target) as out:
    if {is_dir}:
        (out / "part.jsonl").write_text("half a row")
    else:
        out.write("half a row")
        out.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_kill_mid_write_leaves_the_old_output_and_the_next_write_cleans_up(tmp_path, kind, caplog):
    target = tmp_path / ("report.json" if kind == "file" else "tokenized")
    old = b"whole old version\n"
    target.mkdir() if kind == "dir" else target.write_bytes(old)
    if kind == "dir":
        (target / "part.jsonl").write_bytes(old)
    code = KILLED_WRITER.format(kind=kind, is_dir=kind == "dir")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (target / "part.jsonl" if kind == "dir" else target).read_bytes() == old
    assert len(temps_beside(target)) == 1  # what the kill left: a temp, never read as the output

    with caplog.at_level(logging.WARNING, logger=io.log.name):
        if kind == "dir":
            with io.atomic_dir(target) as tmp:
                (tmp / "part.jsonl").write_text("new\n")
        else:
            io.write_json(target, {"new": True})
    assert temps_beside(target) == []
    assert "left by an unfinished write of" in caplog.text
    assert (json.loads(target.read_text()) == {"new": True} if kind == "file"
            else (target / "part.jsonl").read_text() == "new\n")


def test_replacing_a_folder_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    """The old folder is renamed away before the new one is renamed in: a crash between the two leaves no
    `target` at all (the stage reruns) rather than a half-deleted one that looks current."""
    out = tmp_path / "adapter"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).write_text("old")
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(out) as tmp:
            (tmp / "adapter_model.safetensors").write_text("new")
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f".adapter{io.TMP_TAG}")]
    assert sorted(sorted(c.name for c in p.iterdir()) for p in aside) == [
        ["adapter_config.json", "adapter_model.safetensors"], ["adapter_model.safetensors"]]
