"""Download: every source kind, manifest and layout checks, safe extraction, and each error a user can hit."""

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from fixtures.make_fixture_source import LIVEQA_ZIP, TABLE_CSV, TOP_FOLDER, build_fixture_source
from helpers import ROOT

from stages import download
from stages.lib.data.fetch import FetchError, check_link, member_parts, resolve_source, safe_extract



@pytest.fixture(autouse=True)
def no_env_source(monkeypatch):
    # CI exports MEDQUAD_SOURCE for the real pipeline; each test here chooses its own source
    monkeypatch.delenv("MEDQUAD_SOURCE", raising=False)


def run(tmp_path, source=None, manifest=None, env=None, monkeypatch=None, **data):
    """Run the stage with data.source = `source` (or MEDQUAD_SOURCE = `env`); returns the exit status."""
    group = {**yaml.safe_load((ROOT / "params.yaml").read_text())["data"], **data}
    if source is not None:
        group["source"] = str(source)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": group}))
    if env is not None:
        monkeypatch.setenv("MEDQUAD_SOURCE", str(env))
    args = Namespace(params=str(tmp_path / "params.yaml"), manifest=str(manifest or tmp_path / "src" / "manifest.json"),
                     out=str(tmp_path / "out" / "raw"), report=str(tmp_path / "out" / "download.json"))
    return download.main(args)


def assert_no_output(tmp_path):
    out = tmp_path / "out"
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Output of the stage on a plain folder source, to compare every other source kind with."""
    tmp = tmp_path_factory.mktemp("reference")
    source, manifest = build_fixture_source(tmp / "src", "dir")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDQUAD_SOURCE", raising=False)
        assert run(tmp, source=source, manifest=manifest) == 0
    return tmp / "out"


# ---------------------------------------------------------------- sources that work


def test_folder_source_keeps_only_the_dataset_files(reference):
    raw = reference / "raw"
    files = tree_bytes(raw / "medquad")
    assert len(files) == 22 and "readme.txt" in files and "LICENSE.txt" in files
    assert LIVEQA_ZIP not in files and "6_NINDS_QA/0000007.xml" in files
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["format"] == "medquad" and len(manifest["files"]) == 22
    report = json.loads((reference / "download.json").read_text())
    assert report["source_kind"] == "dir" and report["source_origin"] == "params"
    assert report["files_kept"] == 22 and report["skipped"] == [LIVEQA_ZIP]
    assert report["per_collection"]["9_CDC_QA"] == 3 and len(report["manifest_sha256"]) == 64
    assert report["run"]["libraries"]["dvc"] and "git_commit" in report["run"]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_via_env_give_identical_output(tmp_path, monkeypatch, reference, kind):
    source, manifest = build_fixture_source(tmp_path / "src", kind)
    assert run(tmp_path, source="https://unreachable.invalid/x.zip", env=source, monkeypatch=monkeypatch,
               manifest=manifest) == 0
    assert tree_bytes(tmp_path / "out" / "raw") == tree_bytes(reference / "raw")
    report = json.loads((tmp_path / "out" / "download.json").read_text())
    assert report["source_origin"] == "env" and report["source"] == str(source)


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_archive_with_top_folder(tmp_path, http_root, reference):
    www, base = http_root
    archive, manifest = build_fixture_source(tmp_path / "src", "zip")
    shutil.move(archive, www / "577bd37.zip")
    assert run(tmp_path, source=f"{base}/577bd37.zip", manifest=manifest) == 0
    assert tree_bytes(tmp_path / "out" / "raw") == tree_bytes(reference / "raw")


def test_table_file_is_copied(tmp_path):
    assert run(tmp_path, source=TABLE_CSV, format="table") == 0
    raw = tmp_path / "out" / "raw"
    assert (raw / "table.csv").read_bytes() == TABLE_CSV.read_bytes()
    assert json.loads((raw / "manifest.json").read_text())["table"] == "table.csv"


def test_hub_dataset_is_saved_as_parquet(tmp_path, monkeypatch):
    # a local folder stands in for the Hub: datasets.load_dataset reads both the same way
    dataset = tmp_path / "hub" / "medquad-csv"
    dataset.mkdir(parents=True)
    shutil.copy(TABLE_CSV, dataset / "medquad.csv")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    assert run(tmp_path, source=f"hf://{dataset}", format="table", revision="0123abc") == 0
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "out" / "raw" / "table.parquet")
    assert list(frame.columns) == ["qtype", "Question", "Answer"] and len(frame) == 24
    report = json.loads((tmp_path / "out" / "download.json").read_text())
    assert report["source_kind"] == "hf" and report["revision"] == "0123abc"


def test_env_overrides_params():
    assert resolve_source("https://a/b.zip", {}) == ("https://a/b.zip", "params")
    assert resolve_source("https://a/b.zip", {"MEDQUAD_SOURCE": " /data/medquad "}) == ("/data/medquad", "env")


# ---------------------------------------------------------------- failures: message, exit status, no output


def expect_failure(tmp_path, caplog, message, **kwargs):
    assert run(tmp_path, **kwargs) == 1
    assert message in caplog.text, caplog.text
    assert "MEDQUAD_SOURCE" in caplog.text
    assert_no_output(tmp_path)


def test_missing_path(tmp_path, caplog):
    expect_failure(tmp_path, caplog, "path does not exist", source=tmp_path / "nowhere", manifest=ROOT / "params.yaml")
    assert str(tmp_path / "nowhere") in caplog.text


def test_unreachable_url(tmp_path, caplog):
    expect_failure(tmp_path, caplog, "cannot download http://127.0.0.1:9/medquad.zip",
                   source="http://127.0.0.1:9/medquad.zip", manifest=ROOT / "stages/lib/data/medquad_manifest.json")


@pytest.mark.parametrize("content,message", [
    (b"this is not an archive at all", "not a zip or tar(.gz) archive"),
    (b"PK\x03\x04 truncated zip", "corrupt zip archive"),
    (b"\x1f\x8b\x08\x00 truncated gzip", "corrupt tar archive"),
])
def test_corrupt_archive(tmp_path, caplog, content, message):
    (tmp_path / "medquad.zip").write_bytes(content)
    expect_failure(tmp_path, caplog, message, source=tmp_path / "medquad.zip",
                   manifest=ROOT / "stages/lib/data/medquad_manifest.json")


def test_checksum_mismatch_names_the_file(tmp_path, caplog, monkeypatch):
    source, manifest = build_fixture_source(tmp_path / "src", "dir")
    (source / "3_GHR_QA" / "0000002.xml").write_text("<Document/>")
    expect_failure(tmp_path, caplog, "1 checksum mismatch: 3_GHR_QA/0000002.xml", env=source,
                   monkeypatch=monkeypatch, manifest=manifest)


def test_missing_and_unexpected_files(tmp_path, caplog):
    source, manifest = build_fixture_source(tmp_path / "src", "dir")
    (source / "5_NIDDK_QA" / "0000056.xml").unlink()
    (source / "5_NIDDK_QA" / ".DS_Store").write_bytes(b"\0")
    expect_failure(tmp_path, caplog, "1 missing: 5_NIDDK_QA/0000056.xml", source=source, manifest=manifest)
    assert "1 unexpected: 5_NIDDK_QA/.DS_Store" in caplog.text


def test_missing_collection_folder(tmp_path, caplog):
    source, manifest = build_fixture_source(tmp_path / "src", "dir")
    shutil.rmtree(source / "7_SeniorHealth_QA")
    expect_failure(tmp_path, caplog, "not a MedQuAD layout: missing 7_SeniorHealth_QA", source=source,
                   manifest=manifest)


def test_folder_without_medquad(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    expect_failure(tmp_path, caplog, "no MedQuAD collection folder", source=tmp_path / "empty",
                   manifest=ROOT / "stages/lib/data/medquad_manifest.json")


def test_failure_keeps_a_previous_output(tmp_path, caplog):
    source, manifest = build_fixture_source(tmp_path / "src", "dir")
    assert run(tmp_path, source=source, manifest=manifest) == 0
    before = tree_bytes(tmp_path / "out" / "raw")
    assert run(tmp_path, source=tmp_path / "nowhere", manifest=manifest) == 1
    assert tree_bytes(tmp_path / "out" / "raw") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["download.json", "raw"]


def test_hub_source_needs_a_revision_and_table_format(tmp_path, caplog, monkeypatch):
    assert run(tmp_path, source="hf://org/medquad", format="table", revision=None) == 1
    assert "revision is required for hf:// sources" in caplog.text
    caplog.clear()
    # the same checks hold when the env var, not params, brings the hf:// source
    expect_failure(tmp_path, caplog, "hf:// sources are tables", env="hf://org/medquad", monkeypatch=monkeypatch,
                   manifest=ROOT / "stages/lib/data/medquad_manifest.json")


def test_unknown_params_key(tmp_path, caplog):
    assert run(tmp_path, source=TABLE_CSV, sorce="typo") == 1
    assert "[data]" in caplog.text and "sorce" in caplog.text
    assert_no_output(tmp_path)


# ---------------------------------------------------------------- safe extraction


def zip_with(tmp_path, name, data=b"x", symlink_to=None) -> Path:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{TOP_FOLDER}/readme.txt", "fine")
        info = zipfile.ZipInfo(name)
        if symlink_to is not None:
            info.external_attr = (0o120777 << 16)
            data = symlink_to.encode()
        zf.writestr(info, data)
    return archive


def tar_with(tmp_path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo(f"{TOP_FOLDER}/readme.txt")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"fine"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return archive


def symlink(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("make,message", [
    (lambda t: zip_with(t, "../escaped.txt"), "contains '..'"),
    (lambda t: zip_with(t, f"{TOP_FOLDER}/../../escaped.txt"), "contains '..'"),
    (lambda t: zip_with(t, "/tmp/escaped.txt"), "absolute path"),
    (lambda t: zip_with(t, "..\\escaped.txt"), "contains '..'"),
    (lambda t: zip_with(t, f"{TOP_FOLDER}/link", symlink_to="../../../etc/passwd"), "points outside"),
    (lambda t: tar_with(t, tarfile.TarInfo("../escaped.txt"), b"x"), "contains '..'"),
    (lambda t: tar_with(t, tarfile.TarInfo("/tmp/escaped.txt"), b"x"), "absolute path"),
    (lambda t: tar_with(t, symlink(f"{TOP_FOLDER}/link", "/etc/passwd")), "points outside"),
    (lambda t: tar_with(t, symlink(f"{TOP_FOLDER}/a/link", "../../..")), "points outside"),
    (lambda t: tar_with(t, symlink(f"{TOP_FOLDER}/hard", "../outside", tarfile.LNKTYPE)), "points outside"),
    (lambda t: tar_with(t, symlink(f"{TOP_FOLDER}/dev", "", tarfile.CHRTYPE)), "device or fifo"),
])
def test_unsafe_members_are_rejected(tmp_path, caplog, make, message):
    archive = make(tmp_path)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(FetchError, match="unsafe archive"):
        safe_extract(archive, dest)
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    # through the stage: an error that says so, and no output at all
    expect_failure(tmp_path, caplog, message, source=archive, manifest=ROOT / "stages/lib/data/medquad_manifest.json")


def test_links_inside_the_tree_are_allowed_but_not_extracted(tmp_path):
    archive = tar_with(tmp_path, symlink(f"{TOP_FOLDER}/a/link", "../readme.txt"))
    counts = safe_extract(archive, tmp_path / "dest")
    assert counts == {"files": 1, "links_skipped": 1}
    assert not (tmp_path / "dest" / TOP_FOLDER / "a" / "link").exists()


@pytest.mark.parametrize("name,parts", [("a/./b//c.xml", ["a", "b", "c.xml"]), ("./", []), ("a\\b", ["a", "b"])])
def test_member_parts_of_safe_names(name, parts):
    assert member_parts(name) == parts


@pytest.mark.parametrize("name,target", [("a/b", "../../c"), ("a", "sub/../../x"), ("a", "C:/x")])
def test_check_link_rejects_escapes(name, target):
    with pytest.raises(FetchError, match="points outside"):
        check_link(name, target)
