"""One place that turns a question (and answer) into model tokens.

Training, evaluation, `ask` and `export` all render conversations here, so the
model is always asked questions exactly the way it was taught.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import read_json

IGNORE_INDEX = -100

# model.prompt_format: "chat" = the tokenizer's own chat template; "plain" = ### Question / ### Answer text ending in
# EOS, for base models that have no template; "chatml" = <|im_start|>role ... <|im_end|> turns.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# The file the train stage (and export) writes beside the weights it produced: {"weights_sha256": ...}, plus
# "prompt_format" when it is not "chat" (absent = chat, as every adapter made before model.prompt_format)
BASE_MARKER = "base_model.json"


class PromptFormatError(ValueError):
    """The tokenizer cannot render model.prompt_format (no chat template, or the format's tokens are missing)."""

# Tokens that may serve as padding when the tokenizer has none distinct from EOS, in order of preference.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|endoftext|>", "<pad>", "<unk>")


def build_messages(system_prompt: str, question: str, answer: str | None = None, history=()) -> list[dict]:
    """Chat messages: optional system turn, earlier (question, answer) turns, the question, the answer if given."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for past_q, past_a in history:
        messages += [{"role": "user", "content": past_q}, {"role": "assistant", "content": past_a}]
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary has it (not the unknown-token id a tokenizer maps strangers to).

    One lookup, not `get_vocab()`: building that 50k-130k entry dict per example was 87% of tokenize's time.
    """
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
        return None
    return tid


def end_of_turn_ids(tokenizer, prompt_format: str = "chat") -> set[int]:
    """Token ids that end an assistant turn: EOS plus, for `chat`, the chat-specific end tokens in the vocab;
    `plain` ends at EOS only, `chatml` at <|im_end|> or EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = CHATML_TOKENS[1]
    ends = {"chat": (im_end, "<|eot_id|>", "<|end|>", "<end_of_turn>"), "plain": (), "chatml": (im_end,)}
    for token in ends[prompt_format]:
        tid = token_id(tokenizer, token)
        if tid is not None:
            ids.add(tid)
    return ids


# What a chat template writes that is meant as one special token: <|eot_id|>, <|im_end|>, <|end|> ... and Gemma's
# <start_of_turn>/<end_of_turn>. ([INST] is not: Mistral v0.1/v0.2 tokenize it as text.)
_TEMPLATE_TOKEN = re.compile(r"<\|[\w.\-]+\|>|<(?:start|end)_of_turn>")
_TEMPLATE_PROBE = ({"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"})


def missing_template_tokens(tokenizer) -> list[str]:
    """Special-token markers the chat template writes that the vocabulary lacks as one token (each would be split
    into pieces, so the model could never emit the end-of-turn marker as the single token generation stops on)."""
    rendered = tokenizer.apply_chat_template(list(_TEMPLATE_PROBE), tokenize=False, add_generation_prompt=True)
    return sorted({t for t in _TEMPLATE_TOKEN.findall(rendered) if token_id(tokenizer, t) is None})


def check_prompt_format(tokenizer, prompt_format: str, what: str = "the tokenizer", tokens_added: bool = True) -> None:
    """Raise PromptFormatError, naming the param, unless `tokenizer` can render `prompt_format` (cheap: no model).
    tokens_added False: before base_model adds the format's tokens (chatml's), so their absence is not an error."""
    if prompt_format == "chat" and not tokenizer.chat_template:
        raise PromptFormatError(f"{what} has no chat template, which model.prompt_format: chat needs; "
                                "set model.prompt_format: plain (or chatml) to fine-tune a base model")
    if tokenizer.eos_token_id is None:
        raise PromptFormatError(f"{what} has no EOS token; model.prompt_format: {prompt_format} ends answers with it")
    if prompt_format == "chat":
        absent = missing_template_tokens(tokenizer)
        if absent:
            raise PromptFormatError(f"the chat template of {what} writes {', '.join(absent)}, which its vocabulary "
                                    "lacks as single tokens (each would be split into pieces, and the model could "
                                    "not end a turn on one token); use the tokenizer released with the template, "
                                    "or model.prompt_format: plain")
    missing = missing_format_tokens(tokenizer, prompt_format) if tokens_added else []
    if missing:
        raise PromptFormatError(f"{what} lacks the token(s) {', '.join(missing)} that model.prompt_format: "
                                f"{prompt_format} needs; the base_model stage adds them (and trains their embedding "
                                "rows): re-run it with this format, or use model.prompt_format: plain")


def missing_format_tokens(tokenizer, prompt_format: str) -> list[str]:
    """The special tokens `prompt_format` writes that the vocabulary lacks (only chatml writes any)."""
    if prompt_format != "chatml":
        return []
    return [t for t in CHATML_TOKENS if token_id(tokenizer, t) is None]


def check_recorded_format(model_dir: str | Path, prompt_format: str, what: str = "adapter") -> None:
    """Raise PromptFormatError unless the model in `model_dir` records `prompt_format` in its BASE_MARKER;
    a marker without the key (or no marker) is `chat`: adapters trained before the param, or with its default."""
    marker = Path(model_dir) / BASE_MARKER
    recorded = (read_json(marker) if marker.is_file() else {}).get("prompt_format", "chat")
    if recorded != prompt_format:
        raise PromptFormatError(f"the {what} in {model_dir} was trained with model.prompt_format: {recorded}, but "
                                f"params.yaml says {prompt_format}; set model.prompt_format: {recorded} or re-run "
                                "`dvc repro train`")


def render_prompt_text(system_prompt: str, question: str, history=(), prompt_format: str = "plain",
                       eos_token: str = "") -> str:
    """The prompt as text for the `plain` and `chatml` formats, ending where the answer starts.

    plain: an optional system line, then `### Question:\n{q}\n\n### Answer:\n`; each earlier answer is followed
    by the EOS text and a blank line (the model saw EOS end every answer, so history reads as finished turns).
    chatml: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn, then `<|im_start|>assistant\n`.
    """
    if prompt_format == "plain":
        turns = "".join(f"### Question:\n{q}\n\n### Answer:\n{a}{eos_token}\n\n" for q, a in history)
        head = f"{system_prompt}\n" if system_prompt else ""
        return f"{head}{turns}### Question:\n{question}\n\n### Answer:\n"
    if prompt_format == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in build_messages(system_prompt, question, history=history)) + "<|im_start|>assistant\n"
    raise ValueError(f"render_prompt_text renders plain or chatml, not {prompt_format!r}")


# render_prompt_text as HF chat templates, for an exported model's tokenizer (add_generation_prompt is implied: the
# layouts end where the answer starts after every user turn)
HF_TEMPLATES = {
    "plain": ("{%- for m in messages -%}"
              "{%- if m['role'] == 'system' and m['content'] -%}{{ m['content'] + '\\n' }}"
              "{%- elif m['role'] == 'user' -%}{{ '### Question:\\n' + m['content'] + '\\n\\n### Answer:\\n' }}"
              "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token + '\\n\\n' }}"
              "{%- endif -%}{%- endfor -%}"),
    "chatml": ("{%- for m in messages -%}"
               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
}


def _text_ids(tokenizer, text: str, bos: bool) -> list[int]:
    # Special-token text (EOS, <|im_start|>) maps to its id, as llama.cpp does for an Ollama template.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def render_prompt_ids(tokenizer, system_prompt: str, question: str, history=(),
                      prompt_format: str = "chat") -> list[int]:
    """Token ids of the prompt, ending with the assistant header (generation starts right after it)."""
    if prompt_format != "chat":
        text = render_prompt_text(system_prompt, question, history, prompt_format, tokenizer.eos_token or "")
        return _text_ids(tokenizer, text, bos=True)
    messages = build_messages(system_prompt, question, history=history)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def encode_example(tokenizer, system_prompt: str, question: str, answer: str, max_length: int,
                   prompt_format: str = "chat") -> EncodedExample | None:
    """Prompt + answer tokens with labels only on the answer and its end-of-turn token.

    The prompt is never cut: if it alone leaves no room for an answer token the example
    is returned as None (the caller counts it). A long answer is cut to fit and then
    carries no end-of-turn token, so the model is never taught to stop mid-sentence.
    """
    prompt = render_prompt_ids(tokenizer, system_prompt, question, prompt_format=prompt_format)
    if prompt_format != "chat":
        # The answer is tokenized on its own, so the prompt is a prefix by construction; the one end token is
        # EOS (plain) or <|im_end|> (chatml: the "\n" a template would put after it is not a training target).
        end = tokenizer.eos_token_id if prompt_format == "plain" else token_id(tokenizer, CHATML_TOKENS[1])
        return _fit(prompt, _text_ids(tokenizer, answer, bos=False) + [end], max_length)
    full_messages = build_messages(system_prompt, question, answer)
    full = tokenizer.apply_chat_template(full_messages, tokenize=True, return_dict=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation; "
                         "completion-only labels cannot be derived for this tokenizer")
    completion = full[len(prompt):]
    stops = end_of_turn_ids(tokenizer)
    cut = next((i for i, t in enumerate(completion) if t in stops), None)
    if cut is None:
        completion = completion + [tokenizer.eos_token_id]
    else:
        completion = completion[: cut + 1]  # drop template whitespace after the end-of-turn token
    return _fit(prompt, completion, max_length)


def _fit(prompt: list[int], completion: list[int], max_length: int) -> EncodedExample | None:
    room = max_length - len(prompt)
    if room < 1:
        return None
    truncated = len(completion) > room
    completion = completion[:room]
    return EncodedExample(
        input_ids=prompt + completion,
        labels=[IGNORE_INDEX] * len(prompt) + completion,
        prompt_len=len(prompt),
        truncated=truncated,
    )


def choose_pad_token(tokenizer) -> str | None:
    """A pad token distinct from every end-of-turn token, or None if the vocab has no candidate."""
    stops = end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return tokenizer.pad_token
    for token in PAD_CANDIDATES:
        tid = token_id(tokenizer, token)
        if tid is not None and tid not in stops:
            return token
    return None
