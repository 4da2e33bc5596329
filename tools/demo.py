"""Try the model in a browser: the fine-tuned answer and, beside it, the base model's, both streamed.

    make demo                                # then open http://127.0.0.1:7860
    python -m tools.demo --port 8000

Loading, prompt rendering and decoding are tools/ask.py's (its --compare path: one copy of the weights, the base
being the adapter switched off), so an answer here is the one `ask` prints and the evaluate stage scored; the
decoding controls start at params.yaml's `eval` values. The server listens on 127.0.0.1 only, Gradio's analytics
and version check are off, and the page loads nothing but this server's own files (Gradio serves its scripts and
fonts itself). Answers are shown as plain text, so a model that writes a markdown image link fetches nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from stages.lib.config import ConfigError, EvalParams, load_params
from stages.lib.io import setup_quiet_logging
from stages.lib.serving.merge import BaseMismatchError
from stages.lib.model.chat import PromptFormatError
from stages.lib.versions import check_versions
from tools import ask

log = logging.getLogger("tools.demo")

PARAMS = (*ask.PARAMS, "prepare.max_question_chars")
UI_LIBRARIES = ("gradio",)
UI_REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements-ui.txt"
HOST = "127.0.0.1"  # never 0.0.0.0: the demo is for the person at this machine
EXAMPLES = ("What are the symptoms of glaucoma?", "What causes type 2 diabetes?", "How is asthma treated?")
EMPTY = "Please type a question first, for example: *What are the symptoms of glaucoma?*"


def offline_environment() -> None:
    """Before gradio is imported: no analytics (Gradio's version check runs only with them), no hub telemetry."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def question_problem(question: str, max_chars: int) -> str | None:
    """Why a question is not asked (one line for the page), or None."""
    if not question:
        return EMPTY
    if len(question) > max_chars:
        return (f"That question is {len(question):,} characters long; the model was trained on questions of at most "
                f"{max_chars:,} (`prepare.max_question_chars`). Please shorten it.")
    return None


def decoding_names() -> list[str]:
    """The decoding settings `ask` lets a user override (its flags that resolve_decoding reads)."""
    return list(ask.DECODING_FLAGS)


def history_of(chat: list[dict]) -> list[tuple[str, str]]:
    """A chatbot's messages as ask's (question, answer) turns."""
    turns, question = [], None
    for message in chat or []:
        if message["role"] == "user":
            question = message["content"]
        elif message["role"] == "assistant" and question is not None:
            turns.append((question, message["content"]))
            question = None
    return turns


def stream_pieces(respondent: ask.Respondent, system_prompt: str, question: str, decoding) -> Iterator[str]:
    """ask.stream_answer in a thread, its pieces yielded as they come; its error (e.g. too long) re-raised here."""
    pieces: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def run():
        try:
            ask.stream_answer(respondent, system_prompt, question, decoding, pieces.put)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, not swallowed
            failure.append(err)
        finally:
            pieces.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while (piece := pieces.get()) is not None:
        yield piece
    worker.join()
    if failure:
        raise failure[0]


def warm_up(respondents: list[ask.Respondent], system_prompt: str, eval_params: EvalParams) -> float:
    """A two-token answer from each model before the page opens: a process's first generate call pays one-off
    set-up (measured 6.8 s before the first word on the 2-core CPU, against 0.8 s for the next call), which the
    first question would otherwise wait for. Returns the seconds it took."""
    start = time.perf_counter()
    decoding = ask.resolve_decoding(argparse.Namespace(**{**dict.fromkeys(decoding_names()), "max_new_tokens": 2}),
                                    eval_params)
    for respondent in respondents:
        ask.stream_answer(dataclasses.replace(respondent, history=[]), system_prompt, EXAMPLES[0], decoding,
                          lambda _: None)
    return time.perf_counter() - start


def make_responder(respondents: list[ask.Respondent], system_prompt: str, eval_params: EvalParams,
                   max_question_chars: int, names: list[str]):
    """The page's handler: (question, fine-tuned chat, base chat, *decoding values) -> a stream of (fine-tuned chat,
    base chat, status line, question box). Each chat keeps its own history, as in `ask`'s chat."""
    base, tuned = respondents  # ask.load_respondents with --compare: base first
    lock = threading.Lock()  # base and fine-tuned share one model (adapter on/off): one answer at a time

    def respond(question, tuned_chat, base_chat, *values):
        question = (question or "").strip()
        tuned_chat, base_chat = list(tuned_chat or []), list(base_chat or [])
        problem = question_problem(question, max_question_chars)
        if problem is None:
            try:
                decoding = ask.resolve_decoding(argparse.Namespace(**dict(zip(names, values))), eval_params)
            except (ConfigError, TypeError, ValueError) as err:
                problem = f"Decoding settings: {err}"
        if problem:
            yield tuned_chat, base_chat, problem, question
            return
        with lock:
            for chat, respondent in ((tuned_chat, tuned), (base_chat, base)):
                turn = dataclasses.replace(respondent, history=history_of(chat))
                chat += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
                start, first = time.perf_counter(), None
                try:
                    for piece in stream_pieces(turn, system_prompt, question, decoding):
                        first = first or time.perf_counter() - start
                        chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + piece}
                        yield tuned_chat, base_chat, f"{respondent.label} is answering…", ""
                except ask.UsageError as err:
                    del chat[-2:]
                    yield tuned_chat, base_chat, str(err).capitalize() + ".", question
                    return
                chat[-1] = {"role": "assistant", "content": chat[-1]["content"].strip() or "(no answer)"}
                log.info("%s: first piece after %.2f s, answer in %.2f s", respondent.label, first or 0.0,
                         time.perf_counter() - start)
        yield tuned_chat, base_chat, "", ""

    return respond


def build_app(respondents: list[ask.Respondent], system_prompt: str, eval_params: EvalParams,
              max_question_chars: int):
    """The page: the notice, fine-tuned and base chats side by side, a question box, decoding controls."""
    offline_environment()
    import gradio as gr

    base, tuned = respondents
    names = decoding_names()
    respond = make_responder(respondents, system_prompt, eval_params, max_question_chars, names)

    with gr.Blocks(title="MedQuAD LoRA demo", analytics_enabled=False) as app:
        gr.Markdown("## Medical questions: the fine-tuned model beside the base model")
        gr.Markdown(f"**{ask.DISCLAIMER}**", elem_id="notice")
        # plain text (no markdown: an image link in an answer would be fetched), no share button, no feedback
        chat = {"render_markdown": False, "height": 420, "feedback_options": None, "buttons": ["copy", "copy_all"]}
        with gr.Row():
            tuned_box = gr.Chatbot(label=f"{tuned.label} (LoRA adapter)", elem_id="finetuned", **chat)
            base_box = gr.Chatbot(label=f"{base.label} model, before fine-tuning", elem_id="base", **chat)
        question = gr.Textbox(label="Your question", placeholder=EXAMPLES[0], elem_id="question", lines=2,
                              max_lines=6)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            ask_button = gr.Button("Ask both", variant="primary", elem_id="ask")
            clear = gr.Button("New conversation", elem_id="clear")
        gr.Examples([[q] for q in EXAMPLES], inputs=question)
        with gr.Accordion("Decoding (defaults: params.yaml eval, as the answers were scored)", open=False):
            controls = []
            for name in names:
                default = getattr(eval_params, name)
                if isinstance(default, bool):
                    controls.append(gr.Checkbox(value=default, label=name))
                else:
                    controls.append(gr.Number(value=default, label=name, precision=0 if isinstance(default, int)
                                              else None))
        inputs = [question, tuned_box, base_box, *controls]
        outputs = [tuned_box, base_box, status, question]
        ask_button.click(respond, inputs, outputs, concurrency_limit=1)
        question.submit(respond, inputs, outputs, concurrency_limit=1)
        clear.click(lambda: ([], [], "", ""), None, outputs)
    return app


def launch(app, port: int, block: bool = True):
    return app.launch(server_name=HOST, server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
                      mcp_server=False, enable_monitoring=False, run_history=False, footer_links=["settings"],
                      prevent_thread_lock=not block, quiet=True)


def say(line: str) -> None:
    """What the person who started the demo needs to see (the log lines go to --log-file)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params, PARAMS)
        check_versions(ask.LIBRARIES)
        check_versions(UI_LIBRARIES, requirements=UI_REQUIREMENTS)
        ask_args = ask.build_parser().parse_args(["--params", args.params, "--base", args.base, "--adapter",
                                                  args.adapter, "--compare",
                                                  *(["--merged", args.merged] if args.merged else [])])
        ask.check_inputs(ask_args, params["model.prompt_format"])
        say(f"{ask.DISCLAIMER}\nloading the models (fine-tuned and base) ...")
        respondents = ask.load_respondents(ask_args, params["quant"], prompt_format=params["model.prompt_format"])
        log.info("warmed up in %.1f s", warm_up(respondents, params["tokenize.system_prompt"], params["eval"]))
        app = build_app(respondents, params["tokenize.system_prompt"], params["eval"],
                        params["prepare.max_question_chars"])
    except (ConfigError, BaseMismatchError, PromptFormatError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    say(f"open http://{HOST}:{args.port} (Ctrl-C stops it)")
    try:
        launch(app, args.port)
    except OSError as err:  # the port is taken
        log.error("cannot listen on %s:%d: %s (pick another with --port)", HOST, args.port, err)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base", help="base model folder")
    parser.add_argument("--adapter", default="models/adapter", help="LoRA adapter folder")
    parser.add_argument("--merged", help="a merged model folder (make export) instead of base + adapter")
    parser.add_argument("--port", type=int, default=7860, help=f"port on {HOST}")
    parser.add_argument("--log-file", default="logs/demo.log", help="where warnings and log lines go")
    parser.add_argument("--verbose", action="store_true", help="show log lines and warnings too")
    return parser


if __name__ == "__main__":
    cli = build_parser().parse_args()
    setup_quiet_logging(cli.log_file, cli.verbose)
    sys.exit(main(cli))
