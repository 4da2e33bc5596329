"""Batched generation: same greedy answers as one prompt at a time, left padding, input order kept."""

import pytest

from stages.lib.evaluation.generation import Decoding, cut_at_stop, left_pad, length_sorted_batches

QUESTIONS = [
    "What is glaucoma?",
    "What are the symptoms of diabetes and how is it treated in adults and in children?",
    "Is asthma inherited?",
    "How many people are affected by heart disease worldwide each year?",
    "What causes cancer?",
]


@pytest.fixture(scope="module")
def tiny(tiny_base_dir):
    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids
    from stages.lib.config import QuantParams
    from stages.lib.model.loading import load_model_for_inference

    model, tok, _ = load_model_for_inference(tiny_base_dir, None, QuantParams())
    prompts = [render_prompt_ids(tok, "Be careful.", q) for q in QUESTIONS]
    return model, tok, prompts, end_of_turn_ids(tok)


def test_left_pad_right_aligns():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_pad_to_a_wider_block():
    ids, mask = left_pad([[5, 6], [8]], pad_id=0, width=4)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 8]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert left_pad([[5, 6, 7]], pad_id=0, width=2)[0].tolist() == [[5, 6, 7]]  # never narrower than a row


def test_static_kv_cache_is_set_in_the_generation_config():
    from stages.lib.evaluation.generation import generation_config

    assert generation_config(Decoding(max_new_tokens=4), {2}, 0, "static").cache_implementation == "static"
    assert generation_config(Decoding(max_new_tokens=4), {2}, 0).cache_implementation is None


@pytest.mark.parametrize("decoding", [Decoding(max_new_tokens=10),
                                      Decoding(max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2)])
def test_static_cache_gives_the_dynamic_caches_answers(tiny, decoding):
    """The static path pads the prompt block wider and fills the short last batch with copies; neither may change
    an answer (CPU here: the cache layout only, no compile)."""
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, stops = tiny
    batch = len(prompts) - 1  # the second batch has one real row and batch - 1 copies
    dynamic = generate_answers(model, tok, prompts, decoding, batch, stops, progress=False)
    static = generate_answers(model, tok, prompts, decoding, batch, stops, progress=False, kv_cache="static")
    assert len(static) == len(prompts)
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
    assert any(g.token_ids for g in static)


def test_length_sorted_batches_cover_all_longest_first():
    batches = length_sorted_batches([3, 9, 1, 9, 5], batch_size=2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_token_budget_batches():
    from stages.lib.evaluation.generation import token_budget_batches

    # Padded to the longest row: 10 and 9 fill a 20-token budget (2 x 10); adding 8 would make 3 x 10 = 30.
    assert token_budget_batches([9, 2, 10, 30, 8], batch_size=4, budget=20) == [[3], [2, 0], [4, 1]]
    assert token_budget_batches([5, 5, 5], batch_size=2, budget=100) == [[0, 1], [2]]


def test_cut_at_stop():
    assert cut_at_stop([4, 5, 2, 7], {2}) == ([4, 5], True)
    assert cut_at_stop([4, 5], {2}) == ([4, 5], False)


def test_trim_at_stop_keeps_the_stop_token():
    from stages.lib.evaluation.generation import trim_at_stop

    assert trim_at_stop([4, 2, 9, 2], {2}) == [4, 2]
    assert trim_at_stop([4, 9], {2}) == [4, 9]


def test_token_id_batches_equal_one_at_a_time(tiny):
    """The benchmark's tokenizer-free batching: same greedy tokens as one prompt at a time, in input order."""
    from stages.lib.evaluation.generation import generate_batched

    model, tok, prompts, stops = tiny
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=sorted(stops))
    batched = generate_batched(model, prompts, 3, tok.pad_token_id, stops, **kwargs)
    single = [generate_batched(model, [p], 1, tok.pad_token_id, stops, **kwargs)[0] for p in prompts]
    assert batched == single and all(len(a) <= 6 for a in batched)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_equals_one_at_a_time_in_input_order(tiny, penalty):
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, stops = tiny
    decoding = Decoding(max_new_tokens=12, repetition_penalty=penalty)
    batched = generate_answers(model, tok, prompts, decoding, batch_size=3, stop_ids=stops, progress=False)
    single = [generate_answers(model, tok, [p], decoding, batch_size=1, stop_ids=stops, progress=False)[0]
              for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(len(g.token_ids) <= 12 for g in batched)


def test_stops_at_end_of_turn_token(tiny):
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, _ = tiny
    free = generate_answers(model, tok, prompts[:1], Decoding(max_new_tokens=8), 1, stop_ids={10**6},
                            progress=False)[0]
    assert not free.hit_eos and len(free.token_ids) == 8
    # Declare the third token the model produces an end-of-turn token: generation must stop right there.
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    cut = generate_answers(model, tok, prompts[:1], Decoding(max_new_tokens=8), 1, stop_ids={stop},
                           progress=False)[0]
    assert cut.hit_eos and cut.token_ids == free.token_ids[:first]


def test_sampling_is_reproducible_for_a_seed(tiny):
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, stops = tiny
    decoding = Decoding(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    a = generate_answers(model, tok, prompts, decoding, 2, stops, progress=False)
    b = generate_answers(model, tok, prompts, decoding, 2, stops, progress=False)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_generate_rejects_bad_input(tiny):
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, stops = tiny
    with pytest.raises(ValueError, match="no prompts"):
        generate_answers(model, tok, [], Decoding(max_new_tokens=4), 2, stops, progress=False)
    with pytest.raises(ValueError, match="end-of-turn"):
        generate_answers(model, tok, prompts, Decoding(max_new_tokens=4), 2, set(), progress=False)


def test_generate_never_sees_references():
    import inspect

    from stages.lib.evaluation.generation import generate_answers

    params = set(inspect.signature(generate_answers).parameters)
    assert not {"references", "answers", "records"} & params


def repeated_ngrams(tokens, n: int) -> int:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_answer_ngram_blocker_bans_only_the_answers_own_repeats():
    import torch

    from stages.lib.evaluation.generation import AnswerNGramBlocker

    prompt = [5, 6, 7]  # the prompt's bigram (6, 7) may be repeated by the answer; the answer's own may not
    blocker = AnswerNGramBlocker(2, prompt_width=len(prompt))
    banned = []
    for answer in ([], [6], [6, 7], [6, 7, 8], [6, 7, 8, 6]):
        ids = torch.tensor([prompt + answer, prompt + answer])
        scores = blocker(ids, torch.zeros(2, 10))
        banned.append(sorted(int(i) for i in torch.nonzero(scores[0] == float("-inf")).flatten()))
        assert torch.equal(scores[0], scores[1])
    assert banned == [[], [], [], [], [7]]  # after "6" again, "7" would repeat the answer's bigram (6, 7)
    unigram = AnswerNGramBlocker(1, prompt_width=1)
    scores = unigram(torch.tensor([[9, 3, 4]]), torch.zeros(1, 10))
    assert sorted(int(i) for i in torch.nonzero(scores[0] == float("-inf")).flatten()) == [3, 4]
    with pytest.raises(ValueError, match="n must be >= 1"):
        AnswerNGramBlocker(0, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_answer_ngram_blocker_bans_what_the_row_by_row_reference_bans(n):
    """The vectorized blocker against the plain per-row reference, step by step on random loopy answers."""
    import torch

    from stages.lib.evaluation.generation import AnswerNGramBlocker
    from stages.lib.testing.ngram_reference import LoopNGramBlocker

    gen = torch.Generator().manual_seed(n)
    prompt = torch.randint(0, 6, (5, 4), generator=gen)
    answer = torch.randint(0, 6, (5, 30), generator=gen)  # vocab 6: plenty of repeats
    fast, slow = AnswerNGramBlocker(n, prompt_width=4), LoopNGramBlocker(n, prompt_width=4)
    total = 0
    for t in range(answer.shape[1] + 1):
        ids = torch.cat([prompt, answer[:, :t]], dim=1)
        expected = slow(ids, torch.zeros(5, 8)) == float("-inf")
        got = fast(ids, torch.zeros(5, 8)) == float("-inf")
        assert torch.equal(got, expected), (n, t)
        total += int(got.sum())
    assert total > 0


def test_no_repeat_ngram_size_in_batched_generation(tiny):
    """The random tiny model loops; with no_repeat_ngram_size 2 no answer holds a bigram twice, batched or not."""
    from stages.lib.evaluation.generation import generate_answers

    model, tok, prompts, stops = tiny
    loose = generate_answers(model, tok, prompts, Decoding(max_new_tokens=24), 3, stops, progress=False)
    decoding = Decoding(max_new_tokens=24, no_repeat_ngram_size=2)
    strict = generate_answers(model, tok, prompts, decoding, 3, stops, progress=False)
    single = [generate_answers(model, tok, [p], decoding, 1, stops, progress=False)[0] for p in prompts]
    assert sum(repeated_ngrams(g.token_ids, 2) for g in loose) > 0  # without it the model does repeat itself
    assert all(repeated_ngrams(g.token_ids, 2) == 0 for g in strict)
    assert [g.token_ids for g in strict] == [g.token_ids for g in single]
