"""One place that turns a question (and answer) into model tokens.

Training, evaluation, `ask` and `export` all render conversations here, so the
model is always asked questions exactly the way it was taught.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100

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


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn (EOS plus chat-specific end tokens that exist in the vocab)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = token_id(tokenizer, token)
        if tid is not None:
            ids.add(tid)
    return ids


def render_prompt_ids(tokenizer, system_prompt: str, question: str, history=()) -> list[int]:
    """Token ids of the prompt, ending with the assistant header (generation starts right after it)."""
    messages = build_messages(system_prompt, question, history=history)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def encode_example(tokenizer, system_prompt: str, question: str, answer: str, max_length: int) -> EncodedExample | None:
    """Prompt + answer tokens with labels only on the answer and its end-of-turn token.

    The prompt is never cut: if it alone leaves no room for an answer token the example
    is returned as None (the caller counts it). A long answer is cut to fit and then
    carries no end-of-turn token, so the model is never taught to stop mid-sentence.
    """
    prompt = render_prompt_ids(tokenizer, system_prompt, question)
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
