import os
import shutil
from pathlib import Path

import pytest

# Tests never reach a hub; fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama + tokenizer saved like models/base (shared, read-only)."""
    from stages.lib.testing.models import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_dir):
    """Tokenized fixtures + a base folder with source.json, shared by a module's runs."""
    from helpers import run_tokenize

    from stages.lib.io import write_json

    root = tmp_path_factory.mktemp("train_ws")
    base = root / "base"
    shutil.copytree(tiny_base_dir, base)
    write_json(base / "source.json", {"source": "tiny", "weights_sha256": "ab" * 32})
    targs = run_tokenize(root, base)
    return {"root": root, "base": base, "tokenized": Path(targs.out)}


def _hash_seed() -> str:
    return os.environ.get("PYTHONHASHSEED") or "unset (random per process: set it to reproduce a failure)"


def pytest_report_header(config):
    return f"PYTHONHASHSEED={_hash_seed()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # set and dict order follow the hash seed; a failure that depends on it reproduces only with the same value
    if exitstatus != 0:
        terminalreporter.write_line(f"this run had PYTHONHASHSEED={_hash_seed()}; rerun with it to reproduce")


@pytest.fixture(scope="session")
def _chromium():
    from helpers import browser_missing, start_browser

    missing = browser_missing()
    if missing:
        # CI installs the browser (.ci/run); there a missing one is a broken set-up, not a reason to skip
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests cannot run: {missing}")
        pytest.skip(missing)
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture
def browser(_chromium):
    """Headless chromium (one per session), its request log emptied of earlier tests' requests."""
    from helpers import requested_urls

    requested_urls(_chromium)
    return _chromium
