"""Multiple-choice scoring by option log-likelihood, through the prompt format the model was trained with.

Each question is rendered as the user turn (`model.prompt_format`, the system prompt, any k-shot examples as earlier
turns answered with their correct option); each option's text is then scored as the assistant's answer: the sum of
its tokens' log-probabilities (`raw`) and that sum over its token count (`per_token`). The predicted option is the
arg-max of either; both are kept so the choice between them is made where it is allowed to be (on non-test pools).
No letter is generated or parsed: a 135M model picks letters at chance, but its likelihoods still carry signal.

The option text is tokenized on its own after the prompt, as a generated answer would start, and carries no
end-of-turn token (an option is a phrase, not always a whole answer). The prompt runs once per question; its KV cache
is repeated for the options, which run together as one right-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class OptionScore:
    logprob: float  # sum of the option's token log-probabilities given the prompt
    n_tokens: int


def encode_option(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"option {text!r} tokenizes to nothing")
    return ids


def score_continuations(model, prompt_ids: list[int], continuations: list[list[int]]) -> list[OptionScore]:
    """log P(continuation | prompt) for each continuation, the prompt computed once and its cache shared."""
    import torch

    if not prompt_ids or not continuations or any(not c for c in continuations):
        raise ValueError("need a non-empty prompt and non-empty continuations")
    device = next(model.parameters()).device
    n, longest = len(continuations), max(len(c) for c in continuations)
    with torch.inference_mode():
        # logits_to_keep=1: only the last prompt position's logits are needed (the LM head over a 49k vocabulary at
        # every prompt position would be a fifth of the work)
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each option's first token
        rest = None
        if longest > 1:
            cache = out.cache
            cache.batch_repeat_interleave(n)
            # Right padding: pad positions come after every real token, so under the causal mask they change nothing
            # a real token sees. The last token of each option predicts nothing we need, so it is not fed.
            ids = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
            mask = torch.zeros((n, len(prompt_ids) + longest - 1), dtype=torch.long, device=device)
            mask[:, :len(prompt_ids)] = 1
            for i, cont in enumerate(continuations):
                ids[i, :len(cont) - 1] = torch.tensor(cont[:-1], device=device)
                mask[i, len(prompt_ids):len(prompt_ids) + len(cont) - 1] = 1
            logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
            rest = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for i, cont in enumerate(continuations):
            total = first[cont[0]].item()
            if len(cont) > 1:
                total += rest[i, torch.arange(len(cont) - 1, device=device),
                              torch.tensor(cont[1:], device=device)].sum().item()
            scores.append(OptionScore(total, len(cont)))
    return scores


def render_question_ids(tokenizer, system_prompt: str, rec: dict, shots: list[dict], prompt_format: str,
                        question_text) -> list[int]:
    """Prompt ids of a record, its k-shot examples as earlier turns answered with their correct option."""
    from stages.lib.model.chat import render_prompt_ids

    history = [(question_text(s), s["options"][s["answer_index"]]) for s in shots]
    return render_prompt_ids(tokenizer, system_prompt, question_text(rec), history=history,
                             prompt_format=prompt_format)


def score_records(model, tokenizer, records: list[dict], shots: dict[str, list[dict]], system_prompt: str,
                  prompt_format: str, question_text, context_window: int, desc: str = "mcq") -> list[dict]:
    """One row per record: id, suite, subject, answer_index and every option's (logprob, n_tokens)."""
    from tqdm import tqdm

    rows = []
    for rec in tqdm(records, desc=desc, unit="q", mininterval=5):
        prompt = render_question_ids(tokenizer, system_prompt, rec, shots.get(rec["id"], []), prompt_format,
                                     question_text)
        options = [encode_option(tokenizer, text) for text in rec["options"]]
        if len(prompt) + max(len(o) for o in options) > context_window:
            raise ValueError(f"{rec['id']}: prompt ({len(prompt)} tokens) + option exceed the {context_window}-token "
                             "context window; lower mcq.k_shot")
        scores = score_continuations(model, prompt, options)
        rows.append({"id": rec["id"], "suite": rec["suite"], "subject": rec["subject"],
                     "answer_index": rec["answer_index"], "prompt_tokens": len(prompt),
                     "logprob": [s.logprob for s in scores], "n_tokens": [s.n_tokens for s in scores]})
    return rows

