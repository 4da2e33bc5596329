"""Talk to the fine-tuned model: one question, an interactive chat, or base vs fine-tuned side by side.

    python -m tools.ask "What are the symptoms of glaucoma?"
    python -m tools.ask                      # chat; /reset forgets the conversation, /exit leaves
    python -m tools.ask --compare "What causes diabetes?"
    python -m tools.ask --merged models/export "..."

Questions are rendered with the training prompt format (model.prompt_format, checked against the one the adapter
records) and system prompt (stages/lib/model/chat.py),
and decoding defaults to the evaluate stage's params, so answers here are the ones that were scored.
Start-up is quiet: library warnings, progress bars and log lines go to --log-file (logs/ask.log) unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stages.lib.model.chat import PromptFormatError, check_recorded_format, end_of_turn_ids, render_prompt_ids
from stages.lib.config import ConfigError, load_params
from stages.lib.io import setup_quiet_logging
from stages.lib.serving.merge import BASE_MARKER, BaseMismatchError, check_same_base
from stages.lib.versions import check_versions

log = logging.getLogger("tools.ask")

PARAMS = ("eval", "tokenize.system_prompt", "quant", "model.prompt_format")
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "bitsandbytes", "safetensors",
             "tqdm")

DISCLAIMER = ("Note: answers come from a small language model fine-tuned on MedQuAD. They are for education only, "
              "may be wrong or out of date, and are not medical advice; ask a health professional about your own care.")
CHAT_HELP = "Type a question. /reset starts a new conversation, /exit leaves."
PROMPT = "\nyou> "
DECODING_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def notice(chat: bool) -> str:
    """Everything printed before the first answer or prompt: the disclaimer (and in a chat, how to leave)."""
    return DISCLAIMER + "\n" + (CHAT_HELP + "\n" if chat else "")


class UsageError(ValueError):
    """Bad input from the person at the keyboard (not a bug)."""


@dataclass
class Respondent:
    """One model that answers: its label, and how to switch it on (the base shares the PEFT model, adapter off)."""
    label: str
    model: object
    tokenizer: object
    activate: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    history: list = dataclasses.field(default_factory=list)  # its own past (question, answer) turns
    kv_cache: str = "dynamic"  # eval.kv_cache, as the evaluate stage uses it
    prompt_format: str = "chat"  # model.prompt_format, the one the adapter was trained with


def check_inputs(args, prompt_format: str = "chat") -> None:
    """Fail on missing folders, a mismatched base or prompt format before any model is loaded."""
    model_dir = Path(args.merged) if args.merged else Path(args.base)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model in {model_dir} (run `dvc repro base_model`, or `make export` for --merged)")
    if args.merged:
        if args.compare:
            if not (Path(args.base) / "config.json").is_file():
                raise FileNotFoundError(f"--compare needs the base model too; none in {args.base}")
            check_same_base(args.base, args.merged, what="merged model")
        check_recorded_format(args.merged, prompt_format, what="merged model")
        return
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {args.adapter} (run `dvc repro train` first)")
    check_same_base(args.base, args.adapter)
    check_recorded_format(args.adapter, prompt_format)


def load_respondents(args, quant, kv_cache: str = "dynamic", prompt_format: str = "chat") -> list[Respondent]:
    respondents = _load_respondents(args, quant)
    for respondent in respondents:
        respondent.kv_cache = kv_cache
        respondent.prompt_format = prompt_format
    return respondents


def _load_respondents(args, quant) -> list[Respondent]:
    from stages.lib.model.loading import load_model_for_inference

    if args.merged:
        model, tok, _ = load_model_for_inference(args.merged, None, quant)
        tuned = Respondent("fine-tuned (merged)", model, tok)
        if not args.compare:
            return [tuned]
        base_model, base_tok, _ = load_model_for_inference(args.base, None, quant)
        return [Respondent("base", base_model, base_tok), tuned]
    # --compare: one copy of the weights serves both answers, the base being the adapter switched off (so unmerged)
    model, tok, _ = load_model_for_inference(args.base, args.adapter, quant, merge=not args.compare)
    if args.compare:
        return [Respondent("base", model, tok, model.disable_adapter), Respondent("fine-tuned", model, tok)]
    return [Respondent("fine-tuned", model, tok)]


def build_generation_config(decoding, tokenizer, kv_cache: str = "dynamic", prompt_format: str = "chat"):
    """The evaluate stage's own GenerationConfig for a Decoding, so `ask` decodes exactly as answers were scored."""
    from stages.lib.evaluation.generation import generation_config, pad_id_for

    stops = end_of_turn_ids(tokenizer, prompt_format)
    return generation_config(decoding, stops, pad_id_for(tokenizer, stops), kv_cache)


def fit_history(tokenizer, system_prompt: str, question: str, history: list, budget: int,
                prompt_format: str = "chat") -> list[int]:
    """Prompt ids within `budget` tokens, forgetting the oldest turns first."""
    while True:
        ids = render_prompt_ids(tokenizer, system_prompt, question, history, prompt_format)
        if len(ids) <= budget:
            return ids
        if not history:
            raise UsageError(f"the question is too long: {len(ids)} prompt tokens, the model has room for {budget}")
        log.info("conversation too long for the model; forgetting the oldest turn")
        del history[0]


def stream_answer(respondent: Respondent, system_prompt: str, question: str, decoding,
                  write: Callable[[str], object]) -> str:
    """Generate an answer, passing each decoded piece to `write` as it arrives; returns the whole answer."""
    import torch
    from transformers import TextStreamer

    from stages.lib.evaluation.generation import answer_processors

    pieces: list[str] = []

    class WriteStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                pieces.append(text)
                write(text)

    model, tokenizer = respondent.model, respondent.tokenizer
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    ids = fit_history(tokenizer, system_prompt, question, respondent.history, limit - decoding.max_new_tokens,
                      respondent.prompt_format)
    streamer = WriteStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    config = build_generation_config(decoding, tokenizer, respondent.kv_cache, respondent.prompt_format)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad(), respondent.activate():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                       generation_config=config,
                       logits_processor=answer_processors(decoding, [0], len(ids), model.device))
    answer = "".join(pieces).strip()
    respondent.history.append((question, answer))
    return answer


def answer_all(respondents: list[Respondent], system_prompt: str, question: str, decoding, out) -> list[str]:
    answers = []
    for respondent in respondents:
        if len(respondents) > 1:
            out.write(f"\n=== {respondent.label} ===\n")
        answers.append(stream_answer(respondent, system_prompt, question, decoding, out.write))
        out.write("\n")
        out.flush()
    return answers


def chat_loop(respondents: list[Respondent], system_prompt: str, decoding, read_line: Callable[[], str], out) -> None:
    """Multi-turn chat until /exit or end of input; each model keeps its own history."""
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt leaves
            out.write("\n")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            for respondent in respondents:
                respondent.history.clear()
            out.write("(conversation forgotten)\n")
            continue
        if not line:
            continue
        try:
            answer_all(respondents, system_prompt, line, decoding, out)
        except KeyboardInterrupt:
            out.write("\n(answer interrupted)\n")  # Ctrl-C stops one answer, not the chat
        except UsageError as err:
            log.error("%s", err)


def resolve_decoding(args, eval_params):
    """The evaluate stage's Decoding with the command-line overrides (dataclasses.replace re-runs the eval
    params' validation, so a bad flag fails as a bad param would)."""
    from stages.lib.evaluation.generation import decoding_from_params

    overrides = {name: getattr(args, name) for name in DECODING_FLAGS if getattr(args, name) is not None}
    return decoding_from_params(dataclasses.replace(eval_params, **overrides))


def main(args, read_line: Callable[[], str] | None = None, out=None) -> int:
    out = out or sys.stdout
    try:
        if args.question is not None and not args.question.strip():
            raise UsageError("the question is empty; ask something, or leave it out to start a chat")
        params = load_params(args.params, PARAMS)
        decoding = resolve_decoding(args, params["eval"])
        check_versions(LIBRARIES, {"eval": decoding})
        check_inputs(args, params["model.prompt_format"])
        # The notice comes before the (slow) model loading, once the inputs are known to be good.
        out.write(notice(chat=args.question is None))
        out.flush()
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        respondents = load_respondents(args, params["quant"], params["eval"].kv_cache, params["model.prompt_format"])
        system_prompt = params["tokenize.system_prompt"]
        if args.question is not None:
            answer_all(respondents, system_prompt, args.question.strip(), decoding, out)
        else:
            chat_loop(respondents, system_prompt, decoding, read_line or (lambda: input(PROMPT)), out)
    except (UsageError, ConfigError, BaseMismatchError, PromptFormatError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", help="one question; leave out for an interactive chat")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default="models/base", help="base model folder")
    parser.add_argument("--adapter", default="models/adapter", help="LoRA adapter folder")
    parser.add_argument("--merged", help=f"a merged model folder (make export) instead of base + adapter; "
                                         f"--compare then loads --base too, checked through its {BASE_MARKER}")
    parser.add_argument("--compare", action="store_true", help="answer with the base model too, labelled")
    decoding = parser.add_argument_group("decoding (defaults: the eval group of --params)")
    decoding.add_argument("--max-new-tokens", type=int)
    decoding.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    decoding.add_argument("--temperature", type=float)
    decoding.add_argument("--top-p", type=float)
    decoding.add_argument("--repetition-penalty", type=float)
    decoding.add_argument("--no-repeat-ngram-size", type=int, help="0 = off")
    decoding.add_argument("--seed", type=int, help="seed for --do-sample, to repeat a sampled answer")
    parser.add_argument("--log-file", default="logs/ask.log", help="where warnings and log lines go")
    parser.add_argument("--verbose", action="store_true", help="show log lines, warnings and progress bars too")
    return parser


def run(argv=None) -> int:
    """The command line: quiet logging, then main; an unexpected error is one line here, its traceback in the log."""
    args = build_parser().parse_args(argv)
    setup_quiet_logging(args.log_file, args.verbose)
    try:
        return main(args)
    except Exception as err:  # noqa: BLE001 - the console gets one line; the log file keeps the traceback
        log.info("unexpected error", exc_info=True)
        log.error("%s: %s (details in %s)", type(err).__name__, err, args.log_file)
        return 1


if __name__ == "__main__":
    sys.exit(run())
