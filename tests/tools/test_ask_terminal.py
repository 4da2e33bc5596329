"""`python -m tools.ask` driven as a person drives it, in a pseudo-terminal: the notice and the prompt come first
and alone (no library warning, log line or progress bar), a question gets an answer that does not loop, /reset and
/exit work, and a failure is one plain line.

The tiny fixture model runs in CI; with the real pipeline outputs present (models/base, models/adapter) the same
session runs once more on the real fine-tuned model and the committed decoding params.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import ROOT, write_tiny_adapter
from tools import ask

pexpect = pytest.importorskip("pexpect")

QUESTION = "What causes high blood pressure?"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base_dir, tmp_path_factory) -> Path:
    return write_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("ask_tty") / "adapter")


def spawn(tmp_path: Path, *argv: str, timeout: int = 240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "INFO"}  # INFO on: the quiet start must not leak it
    return pexpect.spawn(sys.executable, ["-m", "tools.ask", "--log-file", str(tmp_path / "ask.log"), *argv],
                         cwd=str(ROOT), env=env, encoding="utf-8", timeout=timeout, dimensions=(50, 400))


def screen(text: str) -> str:
    return text.replace("\r\n", "\n")


def chat_session(child, log_file: Path) -> str:
    """Type a question, /reset, /exit; returns the answer. Asserts what the person sees around it."""
    child.expect_exact(ask.PROMPT.strip())
    assert screen(child.before) == ask.notice(chat=True) + "\n"  # the notice, then the prompt: nothing else
    child.sendline(QUESTION)
    child.expect_exact(ask.PROMPT.strip())
    answer = screen(child.before).removeprefix(" " + QUESTION).strip()  # the terminal echoes the typed line
    child.sendline("/reset")
    child.expect_exact("(conversation forgotten)")
    child.expect_exact(ask.PROMPT.strip())
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert log_file.is_file() and "inference precision" in log_file.read_text()  # the log lines went here
    return answer


def test_chat_in_a_terminal_starts_quietly_and_answers(tiny_base_dir, tiny_adapter, tmp_path):
    from stages.lib.evaluation.medqa_metric.medqa_metric import loops

    # Decoding: the committed eval params, except that the random model needs a repetition penalty to say anything
    # before its end-of-turn token (as in test_ask.py) and a short budget.
    child = spawn(tmp_path, "--base", str(tiny_base_dir), "--adapter", str(tiny_adapter), "--max-new-tokens", "40",
                  "--repetition-penalty", "1.3")
    answer = chat_session(child, tmp_path / "ask.log")
    assert answer and not loops(answer), answer


def test_a_failure_is_one_plain_line(tiny_base_dir, tmp_path):
    child = spawn(tmp_path, "--base", str(tiny_base_dir), "--adapter", str(tmp_path / "missing"), "Why?")
    child.expect(pexpect.EOF)
    child.close()
    lines = [line for line in screen(child.before).splitlines() if line.strip()]
    assert child.exitstatus == 2
    assert lines == [f"error: no LoRA adapter in {tmp_path / 'missing'} (run `dvc repro train` first)"]


@pytest.mark.skipif(not (ROOT / "models/adapter/adapter_config.json").is_file(),
                    reason="needs the pipeline's models/base and models/adapter (dvc repro)")
def test_real_model_in_a_terminal(tmp_path):
    from stages.lib.evaluation.medqa_metric.medqa_metric import loops

    answer = chat_session(spawn(tmp_path), tmp_path / "ask.log")  # every decoding value from params.yaml
    assert len(answer.split()) >= 5 and not loops(answer), answer
