"""Model-side inference for evaluation: batched answer generation and teacher-forced answer scoring.

`generate_answers` sees only prompt token ids, never a reference answer, so no decoding choice can peek at the
test set. `score_answers` is the one place that sees reference answers: it measures how likely the model finds
them (the perplexity metric) and generates nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

# Upper bound on padded tokens per scoring micro-batch. The full-vocabulary logits of a micro-batch
# (tokens x vocab x 4 bytes, ~200 MB at 49k vocab) dominate memory; the value changes only float rounding.
SCORE_TOKEN_BUDGET = 1024


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded; built from the eval params so evaluate and the decoding benchmark agree."""
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0


def decoding_from_params(p) -> Decoding:
    """The eval params' decoding: the one place evaluate, `ask`, the demo and the decoding tools build it."""
    return Decoding(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
                    top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                    no_repeat_ngram_size=p.no_repeat_ngram_size, seed=p.seed)


@dataclass(frozen=True)
class Generation:
    text: str                 # decoded answer, special tokens and surrounding whitespace removed
    token_ids: tuple          # new tokens before the end-of-turn token (which is not included)
    hit_eos: bool             # False = cut by max_new_tokens


# Static-cache runs left-pad every batch to the longest prompt of the run rounded up to a multiple of this: the
# compiled decode step then sees one shape per run (each new shape costs a recompile), and prefill pays the padding.
STATIC_WIDTH_STEP = 16


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """(input_ids, attention_mask), sequences right-aligned: every row's next token goes in the same column.
    `width` (at least the longest sequence) widens the block with more padding."""
    import torch

    width = max(width or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length, longest first: little padding, and a memory problem shows up at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_budget_batches(lengths: Sequence[int], batch_size: int, budget: int) -> list[list[int]]:
    """Length-sorted index batches (longest first) of at most batch_size rows and `budget` padded tokens;
    a row longer than the budget gets a batch of its own."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and lengths[last[0]] * (len(last) + 1) <= budget:
            last.append(i)
        else:
            batches.append([i])
    return batches


def cut_at_stop(new_ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens before the first end-of-turn token, and whether one was produced."""
    for i, tok in enumerate(new_ids):
        if tok in stop_ids:
            return list(new_ids[:i]), True
    return list(new_ids), False


def trim_at_stop(new_ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """New tokens up to and including the first stop token (what a benchmark counts as generated)."""
    kept, hit = cut_at_stop([int(t) for t in new_ids], stop_ids)
    return kept + [int(new_ids[len(kept)])] if hit else kept


def pad_id_for(tokenizer, stop_ids: set[int]) -> int:
    # Any id works for left padding (the attention mask hides it); prefer the tokenizer's own.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


class AnswerNGramBlocker:
    """A logits processor that bans, in each row, every token that would repeat an n-gram the answer already holds.

    transformers' no_repeat_ngram_size counts the prompt too (the system prompt and the question), so an answer
    could not restate the question's own words ("The symptoms of glaucoma ..."); here only tokens after
    `prompt_width` (the left-padded prompt block, the same for every row of a batch) count. All tensor work on the
    device, with no copy to the host: a compiled decode step then never waits for Python.
    """

    def __init__(self, n: int, prompt_width: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.prompt_width = n, prompt_width

    def __call__(self, input_ids, scores):
        import torch

        answer = input_ids[:, self.prompt_width:]
        n, length = self.n, answer.shape[1]
        if length < n:  # not one whole n-gram yet
            return scores
        if n == 1:
            follows, hits = answer, torch.ones_like(answer, dtype=torch.bool)
        else:
            # Window j holds answer[j : j+n-1]; it is followed by answer[j+n-1]. A window equal to the answer's
            # last n-1 tokens bans the token that followed it.
            windows = answer.unfold(1, n - 1, 1)[:, :length - n + 1]
            hits = (windows == answer[:, None, length - n + 1:]).all(-1)
            follows = answer[:, n - 1:]
        # -inf at the banned tokens, +inf (no change under amin) at the rest: the work is rows x answer length, not
        # rows x vocabulary, and amin does not depend on the order of repeated indices.
        fill = torch.full(follows.shape, float("inf"), dtype=scores.dtype, device=scores.device)
        fill = fill.masked_fill(hits, float("-inf"))
        return scores.scatter_reduce_(1, follows, fill, reduce="amin", include_self=True)  # in place, as the
        # per-row version did: generate hands processors its own copy of the logits


def generation_config(decoding: Decoding, stop_ids: set[int], pad_id: int, kv_cache: str = "dynamic"):
    """eval.kv_cache "static" preallocates the cache; on CUDA transformers then compiles the decode step and replays
    it as CUDA graphs (on CPU nothing is compiled). Speed and the open answer check: benchmarks/README.md."""
    from transformers import GenerationConfig

    # A fresh config, not the model's generation_config: a checkpoint's saved defaults
    # (temperature, top_k, max_length ...) must not silently change evaluation decoding.
    kwargs = dict(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                  eos_token_id=sorted(stop_ids), pad_token_id=pad_id, use_cache=True,
                  repetition_penalty=decoding.repetition_penalty)
    if kv_cache == "static":
        kwargs["cache_implementation"] = "static"
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    return GenerationConfig(**kwargs)


def answer_processors(decoding: Decoding, n_pad: Sequence[int], prompt_width: int, device=None):
    """The logits processors `decoding` needs beyond its GenerationConfig, for a left-padded batch whose rows carry
    `n_pad` padding columns before their prompt and whose prompt block is `prompt_width` columns wide."""
    import torch
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if decoding.repetition_penalty != 1.0:
        # Same type as the processor generate() builds from the config, so it replaces it: the padding
        # columns are ignored, otherwise a padded row would also penalise the pad token.
        processors.append(RepetitionPenaltyLogitsProcessor(
            float(decoding.repetition_penalty),
            prompt_ignore_length=torch.tensor(list(n_pad), dtype=torch.long, device=device)))
    if decoding.no_repeat_ngram_size:
        processors.append(AnswerNGramBlocker(decoding.no_repeat_ngram_size, prompt_width))
    return processors


def generate_answers(model, tokenizer, prompts: Sequence[Sequence[int]], decoding: Decoding, batch_size: int,
                     stop_ids: set[int], progress: bool = True, kv_cache: str = "dynamic") -> list[Generation]:
    """Answer every prompt (token ids ending with the assistant header); results come back in input order.

    Prompts are grouped by length and left-padded, so a batch decodes in lock-step with little padding.
    Greedy decoding gives the same answers as one prompt at a time (up to float rounding).

    kv_cache "static" preallocates the cache and lets transformers compile the decode step (CUDA graphs); every
    batch then has the same shape: a short batch is filled with copies of its last prompt (answers dropped) and
    every prompt block is as wide as the run's longest prompt, rounded up to STATIC_WIDTH_STEP.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("no prompts to generate from")
    if not stop_ids:
        raise ValueError("no end-of-turn token ids: generation could never stop early")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt (a chat template always renders at least the assistant header)")
    pad_id = pad_id_for(tokenizer, stop_ids)
    config = generation_config(decoding, stop_ids, pad_id, kv_cache)
    device = next(model.parameters()).device
    if decoding.do_sample:
        # One seed for the whole run: reproducible for a fixed batch size and prompt set.
        torch.manual_seed(decoding.seed)

    results: list[Generation | None] = [None] * len(prompts)
    n_new = 0
    start = time.perf_counter()
    batches = length_sorted_batches([len(p) for p in prompts], batch_size)
    bar = tqdm(batches, desc="generate", unit="batch", disable=not progress)
    static = kv_cache == "static"
    width = None
    if static:
        width = -(-max(len(p) for p in prompts) // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
    for batch in bar:
        seqs = [prompts[i] for i in batch]
        if static:
            seqs += [seqs[-1]] * (batch_size - len(seqs))
        ids, mask = left_pad(seqs, pad_id, width)
        processors = answer_processors(decoding, [ids.shape[1] - len(s) for s in seqs], ids.shape[1], device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, logits_processor=processors)
        new = out[:len(batch), ids.shape[1]:].tolist()
        for i, row in zip(batch, new):
            tokens, hit = cut_at_stop(row, stop_ids)
            n_new += len(tokens) + int(hit)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results[i] = Generation(text=text, token_ids=tuple(tokens), hit_eos=hit)
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    log.info("generated %d new tokens for %d prompts in %.1f s (%.1f new tokens/s, batch size %d)",
             n_new, len(prompts), elapsed, n_new / max(elapsed, 1e-9), batch_size)
    return results  # type: ignore[return-value]


def generate_batched(model, prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, stop_ids: set[int],
                     **generate_kwargs) -> list[list[int]]:
    """Token ids only, no tokenizer or decoding config: `generate_answers`' batching for benchmarks on random
    token ids. Greedy answers (new tokens, trimmed at the first stop token) in the prompts' order. Unlike
    `generate_answers`, a repetition penalty here also sees the padding of shorter rows."""
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    answers: list[list[int] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    for idx in length_sorted_batches([len(p) for p in prompts], batch_size):
        ids, mask = (t.to(device) for t in left_pad([prompts[i] for i in idx], pad_id))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **generate_kwargs)
        for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
            answers[i] = trim_at_stop(row, stop_ids)
    return answers  # type: ignore[return-value]


@dataclass(frozen=True)
class AnswerScore:
    nll_sum: float    # summed negative log-likelihood (nats) of the answer tokens
    n_tokens: int     # answer tokens scored (including the end-of-turn token when the answer fits)


def score_answers(model, examples: Sequence, batch_size: int, pad_id: int, progress: bool = True) -> list[AnswerScore]:
    """Teacher-forced NLL of each example's labelled tokens (chat.EncodedExample: input_ids + labels, -100 = unscored).

    Perplexity over a set is exp(sum nll_sum / sum n_tokens): a token-weighted mean, as a causal-LM loss is.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from stages.lib.model.chat import IGNORE_INDEX

    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    lengths = [len(ex.input_ids) for ex in examples]
    batches = token_budget_batches(lengths, batch_size, SCORE_TOKEN_BUDGET)
    scores: list[AnswerScore | None] = [None] * len(examples)
    n_total = 0
    start = time.perf_counter()
    for batch in tqdm(batches, desc="score answers", unit="batch", disable=not progress):
        width = lengths[batch[0]]
        # Right padding: causal attention never lets a real token see the padding after it.
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = lengths[i]
            ids[row, :n] = torch.tensor(examples[i].input_ids)
            labels[row, :n] = torch.tensor(examples[i].labels)
            mask[row, :n] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # Token t is predicted from the positions before it.
            target = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
            counted = target != IGNORE_INDEX
            sums = (nll * counted).sum(dim=1).tolist()
            counts = counted.sum(dim=1).tolist()
        for row, i in enumerate(batch):
            scores[i] = AnswerScore(nll_sum=float(sums[row]), n_tokens=int(counts[row]))
            n_total += int(counts[row])
    elapsed = time.perf_counter() - start
    log.info("scored %d answer tokens of %d examples in %.1f s (%.1f forward tokens/s, prompts included)",
             n_total, len(examples), elapsed, sum(lengths) / max(elapsed, 1e-9))
    return scores  # type: ignore[return-value]
