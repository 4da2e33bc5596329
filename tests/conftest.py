import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Tests never reach a hub; fail fast instead of hanging on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama + tokenizer saved like models/base (shared, read-only)."""
    from tiny import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


def _hash_seed() -> str:
    return os.environ.get("PYTHONHASHSEED") or "unset (random per process: set it to reproduce a failure)"


def pytest_report_header(config):
    return f"PYTHONHASHSEED={_hash_seed()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # set and dict order follow the hash seed; a failure that depends on it reproduces only with the same value
    if exitstatus != 0:
        terminalreporter.write_line(f"this run had PYTHONHASHSEED={_hash_seed()}; rerun with it to reproduce")
