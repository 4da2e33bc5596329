"""demo: the Gradio page on a tiny model and adapter, driven in headless chromium. A real question gets streamed
answers from both models, an empty or overlong one a clear message, the notice is on the page, the server listens
on loopback only, and neither the browser nor the server sends a request off the machine."""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from ipaddress import ip_address

import pytest

from helpers import ROOT, outside_requests, save_screenshot, write_tiny_adapter
from tools import ask, demo

from stages.lib.config import load_params

PARAMS = ROOT / "params.yaml"
QUESTION = "What are the symptoms of glaucoma?"
MAX_CHARS = 60
OUTBOUND: list[str] = []  # connections this process tried to open to anything but loopback


def _audit(event, args):
    # socket.connect is raised before any connection is made, so this sees attempts too (a version check, analytics)
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _loopback(str(address[0])):
            OUTBOUND.append(f"connect {address}")
    elif event == "socket.getaddrinfo" and args[0] and not _loopback(str(args[0])):
        OUTBOUND.append(f"resolve {args[0]}")


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


sys.addaudithook(_audit)  # process-wide and permanent; it only records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parts(tiny_base_dir, tmp_path_factory):
    """(respondents, system prompt, eval params, decoding names) as `make demo` builds them, on the tiny model."""
    adapter = write_tiny_adapter(tiny_base_dir, tmp_path_factory.mktemp("demo") / "adapter")
    args = ask.build_parser().parse_args(["--base", str(tiny_base_dir), "--adapter", str(adapter), "--compare"])
    params = load_params(PARAMS, demo.PARAMS)
    # As in test_ask: the tuned defaults can make a random tiny model stop at once; these need text.
    eval_params = dataclasses.replace(params["eval"], max_new_tokens=6, repetition_penalty=1.3)
    return ask.load_respondents(args, params["quant"]), params["tokenize.system_prompt"], eval_params


@pytest.fixture(scope="module")
def app_url(parts):
    respondents, system_prompt, eval_params = parts
    app = demo.build_app(respondents, system_prompt, eval_params, MAX_CHARS)
    OUTBOUND.clear()
    demo.launch(app, _free_port(), block=False)
    yield app.local_url
    app.close()


def _messages(browser, box: str, role: str) -> list[str]:
    return browser.execute_script(
        f"return [...document.querySelectorAll('#{box} [data-testid=\"{role}\"]')].map(e => e.innerText.trim())")


def _wait(browser, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the page")


def _ask(browser, text: str) -> None:
    # Gradio mounts the page's components one by one: the notice can be there before the question box
    box = _wait(browser, lambda: browser.find_elements("css selector", "#question textarea"))[0]
    box.clear()
    box.send_keys(text)
    _wait(browser, lambda: browser.find_elements("css selector", "#ask"))[0].click()


def _status(browser) -> str:
    return browser.find_element("css selector", "#status").text.strip()


def test_a_question_gets_both_answers_in_the_browser_and_nothing_leaves_the_machine(app_url, browser):
    assert app_url.startswith("http://127.0.0.1:")
    browser.get(app_url)
    notice = _wait(browser, lambda: browser.find_elements("css selector", "#notice"))[0]
    assert notice.is_displayed() and "not medical advice" in notice.text

    _ask(browser, QUESTION)
    _wait(browser, lambda: len(_messages(browser, "base", "bot")) == 1 and not _status(browser))
    tuned, base = _messages(browser, "finetuned", "bot"), _messages(browser, "base", "bot")
    save_screenshot(browser, "demo")
    assert _messages(browser, "finetuned", "user") == _messages(browser, "base", "user") == [QUESTION]
    assert len(tuned) == 1 and tuned[0] and tuned[0] != "(no answer)"
    assert len(base) == 1 and base[0]
    assert outside_requests(browser) == []
    assert OUTBOUND == []


@pytest.mark.parametrize("text, message", [("   ", "Please type a question first"),
                                           ("why " * 20, "79 characters long; the model was trained on questions "
                                                         "of at most 60")])
def test_empty_or_overlong_questions_get_a_message_not_an_answer(app_url, browser, text, message):
    browser.get(app_url)
    _ask(browser, text)
    assert message in _wait(browser, lambda: _status(browser))
    assert _messages(browser, "finetuned", "bot") == _messages(browser, "base", "bot") == []
    save_screenshot(browser, "demo_" + ("empty" if not text.strip() else "overlong"))
    assert outside_requests(browser) == [] and OUTBOUND == []


def test_answers_are_asks_answers_and_each_chat_keeps_its_history(parts, monkeypatch):
    respondents, system_prompt, eval_params = parts
    names = demo.decoding_names()
    respond = demo.make_responder(respondents, system_prompt, eval_params, MAX_CHARS, names)
    defaults = [None] * len(names)  # empty controls: eval params as they are
    *_, (tuned_chat, base_chat, status, box) = respond(QUESTION, [], [], *defaults)
    assert status == "" and box == ""
    decoding = ask.resolve_decoding(ask.build_parser().parse_args([]), eval_params)
    for chat, respondent in ((tuned_chat, respondents[1]), (base_chat, respondents[0])):
        alone = ask.stream_answer(dataclasses.replace(respondent, history=[]), system_prompt, QUESTION, decoding,
                                  lambda _: None)
        assert chat == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": alone or "(no answer)"}]
    assert respondents[1].history == []  # the shared respondent is not the session's

    seen = []
    real = ask.render_prompt_ids

    def spy(tokenizer, system, question, history=(), prompt_format="chat"):
        seen.append(len(history))
        return real(tokenizer, system, question, history, prompt_format)

    monkeypatch.setattr(ask, "render_prompt_ids", spy)
    list(respond("And how is it treated?", tuned_chat, base_chat, *defaults))
    assert seen == [1, 1]  # each model saw its own first turn


def test_decoding_controls_are_asks_eval_overrides_and_bad_values_are_explained(parts):
    respondents, system_prompt, eval_params = parts
    names = demo.decoding_names()
    assert {"max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty"} <= set(names)
    assert "bertscore_model" not in names and "batch_size" not in names
    respond = demo.make_responder(respondents, system_prompt, eval_params, MAX_CHARS, names)
    values = [0.0 if name == "top_p" else None for name in names]
    (tuned_chat, base_chat, status, box), = respond(QUESTION, [], [], *values)
    assert "Decoding settings" in status and "top_p" in status and tuned_chat == base_chat == []


def test_warm_up_leaves_no_history(parts):
    respondents, system_prompt, eval_params = parts
    assert demo.warm_up(respondents, system_prompt, eval_params) > 0
    assert [r.history for r in respondents] == [[], []]


def test_question_problems():
    assert demo.question_problem("", 10) == demo.EMPTY
    assert "11 characters long" in demo.question_problem("x" * 11, 10)
    assert demo.question_problem("x" * 10, 10) is None


def test_missing_adapter_is_one_clear_error(tiny_base_dir, tmp_path, caplog):
    args = demo.build_parser().parse_args(["--params", str(PARAMS), "--base", str(tiny_base_dir),
                                           "--adapter", str(tmp_path / "none")])
    assert demo.main(args) == 2
    assert "no LoRA adapter" in caplog.text
