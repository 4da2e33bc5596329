"""model.prompt_format: `chat` renders exactly what it did before the param existed; `plain` and `chatml` have
completion-only labels ending in their one end token; a tokenizer that cannot render a format is refused by name."""

from __future__ import annotations

import pytest

from stages.lib.config import ConfigError, parse_group
from stages.lib.model.chat import (IGNORE_INDEX, PromptFormatError, check_prompt_format, encode_example,
                                   end_of_turn_ids, render_prompt_ids, render_prompt_text)

QUESTIONS = ["What are the symptoms of glaucoma?", "How is it treated?", "Is diabetes inherited?"]
ANSWER = "Glaucoma often has no symptoms at first; side vision is lost slowly."
HISTORY = [("What is glaucoma?", "An eye disease that damages the optic nerve.")]


# ------------------------------------------------ the code as it was before prompt_format (commit c42324e), frozen

def _legacy_prompt(tokenizer, system_prompt, question, history=()):
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids), messages


def _legacy_encode(tokenizer, system_prompt, question, answer, max_length):
    prompt, messages = _legacy_prompt(tokenizer, system_prompt, question)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    completion = full[len(prompt):]
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",)}
    cut = next((i for i, t in enumerate(completion) if t in stops), None)
    completion = completion + [tokenizer.eos_token_id] if cut is None else completion[: cut + 1]
    room = max_length - len(prompt)
    if room < 1:
        return None
    return prompt + completion[:room], [IGNORE_INDEX] * len(prompt) + completion[:room]


@pytest.mark.parametrize("system_prompt", ["", "You are a careful medical information assistant."])
@pytest.mark.parametrize("room", [0, 3, 1000])  # no room for an answer (dropped), a cut answer, the whole answer
def test_chat_format_is_byte_identical_to_before(tiny_tokenizer, system_prompt, room):
    """The default keeps the committed pipeline outputs valid: same prompt ids, input ids and labels as before."""
    for question in QUESTIONS:
        for history in ((), HISTORY):
            assert render_prompt_ids(tiny_tokenizer, system_prompt, question, history) == \
                _legacy_prompt(tiny_tokenizer, system_prompt, question, history)[0]
        max_length = len(_legacy_prompt(tiny_tokenizer, system_prompt, question)[0]) + room
        enc = encode_example(tiny_tokenizer, system_prompt, question, ANSWER, max_length)
        legacy = _legacy_encode(tiny_tokenizer, system_prompt, question, ANSWER, max_length)
        assert (enc and (enc.input_ids, enc.labels)) == legacy
    assert end_of_turn_ids(tiny_tokenizer) == end_of_turn_ids(tiny_tokenizer, "chat")


# ------------------------------------------------ plain

def test_plain_text_is_exactly_the_documented_layout(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    assert render_prompt_text("", "Q1?", prompt_format="plain") == "### Question:\nQ1?\n\n### Answer:\n"
    assert render_prompt_text("Be careful.", "Q1?", prompt_format="plain") == \
        "Be careful.\n### Question:\nQ1?\n\n### Answer:\n"
    # history: each earlier block in the same layout, its answer closed by the EOS text and a blank line
    assert render_prompt_text("", "Q2?", [("Q1?", "A1.")], "plain", eos) == \
        f"### Question:\nQ1?\n\n### Answer:\nA1.{eos}\n\n### Question:\nQ2?\n\n### Answer:\n"


def test_plain_labels_cover_the_answer_and_eos_only(tiny_tokenizer):
    enc = encode_example(tiny_tokenizer, "Be careful.", QUESTIONS[0], ANSWER, 1024, prompt_format="plain")
    prompt = render_prompt_ids(tiny_tokenizer, "Be careful.", QUESTIONS[0], prompt_format="plain")
    assert enc.input_ids[: enc.prompt_len] == prompt
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert enc.labels[-1] == tiny_tokenizer.eos_token_id and not enc.truncated
    assert tiny_tokenizer.decode(enc.input_ids[enc.prompt_len:-1]) == ANSWER
    assert tiny_tokenizer.decode(prompt) == f"Be careful.\n### Question:\n{QUESTIONS[0]}\n\n### Answer:\n"
    assert end_of_turn_ids(tiny_tokenizer, "plain") == {tiny_tokenizer.eos_token_id}


def test_plain_history_renders_eos_as_its_token(tiny_tokenizer):
    ids = render_prompt_ids(tiny_tokenizer, "", "Q2?", [("Q1?", "A1.")], prompt_format="plain")
    assert ids.count(tiny_tokenizer.eos_token_id) == 1


# ------------------------------------------------ chatml

def test_chatml_matches_the_chatml_template_and_ends_at_im_end(tiny_tokenizer):
    """The tiny tokenizer's own template is ChatML, so the two renderings must agree token for token."""
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for history in ((), HISTORY):
        assert render_prompt_ids(tiny_tokenizer, "Sys.", QUESTIONS[1], history, prompt_format="chatml") == \
            render_prompt_ids(tiny_tokenizer, "Sys.", QUESTIONS[1], history)
    enc = encode_example(tiny_tokenizer, "Sys.", QUESTIONS[0], ANSWER, 1024, prompt_format="chatml")
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert enc.labels[-1] == im_end
    assert im_end in end_of_turn_ids(tiny_tokenizer, "chatml")


@pytest.mark.parametrize("prompt_format", ["plain", "chatml"])
def test_a_cut_answer_carries_no_end_token(tiny_tokenizer, prompt_format):
    prompt = render_prompt_ids(tiny_tokenizer, "", QUESTIONS[0], prompt_format=prompt_format)
    enc = encode_example(tiny_tokenizer, "", QUESTIONS[0], ANSWER, len(prompt) + 3, prompt_format=prompt_format)
    assert enc.truncated and len(enc.input_ids) == len(prompt) + 3
    assert enc.labels[-1] not in end_of_turn_ids(tiny_tokenizer, prompt_format)
    assert encode_example(tiny_tokenizer, "", QUESTIONS[0], ANSWER, len(prompt), prompt_format=prompt_format) is None


# ------------------------------------------------ refusals

def _tokenizer_without(tiny_tokenizer, drop_template: bool):
    """A base-model-like tokenizer: no chat template, and no <|im_start|>/<|im_end|>; EOS <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for t, i in tiny_tokenizer.get_vocab().items() if t not in ("<|im_start|>", "<|im_end|>")}
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(sorted(vocab))}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if not drop_template:
        fast.chat_template = tiny_tokenizer.chat_template
    return fast


def test_chat_without_a_template_is_refused_naming_the_param(tiny_tokenizer):
    base_like = _tokenizer_without(tiny_tokenizer, drop_template=True)
    with pytest.raises(PromptFormatError, match="model.prompt_format: plain"):
        check_prompt_format(base_like, "chat", "models/base")
    check_prompt_format(base_like, "plain")  # a base model without a template is fine with plain


def test_chatml_without_its_tokens_is_refused_naming_them(tiny_tokenizer):
    with pytest.raises(PromptFormatError, match=r"lacks the token\(s\) <\|im_start\|>, <\|im_end\|>"):
        check_prompt_format(_tokenizer_without(tiny_tokenizer, drop_template=True), "chatml")
    check_prompt_format(tiny_tokenizer, "chatml")


def test_unknown_prompt_format_is_a_config_error():
    with pytest.raises(ConfigError, match="prompt_format must be one of chat, plain, chatml"):
        parse_group("model", {"source": "x", "prompt_format": "alpaca"})
    assert parse_group("model", {"source": "x"}).prompt_format == "chat"


@pytest.mark.parametrize("prompt_format", ["plain", "chatml"])
@pytest.mark.parametrize("system_prompt", ["", "Be careful."])
def test_hf_template_of_a_format_renders_what_chat_py_renders(tiny_tokenizer, prompt_format, system_prompt):
    """The chat template an export carries for plain/chatml gives the exact prompt text training used."""
    import copy

    from stages.lib.model.chat import HF_TEMPLATES, build_messages

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = HF_TEMPLATES[prompt_format]
    for history in ((), HISTORY):
        messages = build_messages(system_prompt, QUESTIONS[1], history=history)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            render_prompt_text(system_prompt, QUESTIONS[1], history, prompt_format, tok.eos_token)
