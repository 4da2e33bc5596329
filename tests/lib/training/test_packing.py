"""Speed levers must not change the work: packed loss = per-example losses, chunked CE = standard CE."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from stages.lib.testing import batches  # noqa: E402
from stages.lib.training import chunked_loss, speedups, varlen_attention  # noqa: E402
from stages.lib.model.chat import IGNORE_INDEX  # noqa: E402

VOCAB = 96


def make_examples(lengths, seed=0, prompt_frac=0.4):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        p = max(1, int(n * prompt_frac))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def tiny_llama(attn="sdpa", seed=0):
    from stages.lib.testing import models

    return models.tiny_llama(VOCAB, seed, max_position_embeddings=256, tie_word_embeddings=False,
                             attn_implementation=attn).eval().float()


def per_example_sums(model, examples):
    """(sum of token CE, label-token count) of each example run alone."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        y = labels[0, 1:]
        out.append((torch.nn.functional.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX),
                    int((y != IGNORE_INDEX).sum())))
    return out


# ---------------------------------------------------------------------------------------------- the planner


def test_bins_respect_budget_and_cover_every_example_once():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    bins = batches.plan_packed_batches(lengths, 1024)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    # best-fit decreasing is near-optimal: at most one bin more than the volume bound, plus a little
    assert len(bins) <= -(-sum(lengths) // 1024) + 2


def test_example_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match="longer than token_budget"):
        batches.plan_packed_batches([10, 2000], 1024)


def test_collate_packed_restarts_positions_and_masks_boundaries():
    examples = make_examples([5, 3, 4])
    batch = batches.collate_packed(examples)
    assert batch["input_ids"].shape == (1, 12)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[5] == labels[8] == IGNORE_INDEX  # no prediction across an example boundary
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 12]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 5
    # prompt labels stay -100, answer labels stay the token ids
    for ex, s in zip(examples, (0, 5, 8)):
        assert labels[s + 1:s + len(ex["labels"])] == ex["labels"][1:]


def test_collate_padded_masks_padding_in_labels():
    examples = make_examples([5, 3])
    batch = batches.collate_padded(examples, pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 2


# ------------------------------------------------------------------------------------------- packed == alone


@pytest.mark.parametrize("attn", ["sdpa", varlen_attention.VARLEN_ATTENTION])
def test_packed_loss_equals_per_example_losses(attn):
    """One packed row gives each example exactly the loss it has alone (no attention across examples).

    The packed loss is the token-mean over the batch: sum of per-example summed CE / total label tokens, the
    same normalisation as a padded batch; with equal label counts that is the plain mean of per-example losses.
    """
    varlen_attention.register_varlen_attention()
    model = tiny_llama(attn)
    examples = make_examples([17, 9, 30, 4, 12])
    alone = per_example_sums(model, examples)
    packed = batches.collate_packed(examples)
    with torch.no_grad():
        # transformers' own loss on the packed row. use_cache=False matters: with a cache (the default of
        # config.use_cache) masking_utils skips packed-sequence detection and examples attend to each other.
        hf_loss = model(**packed, use_cache=False).loss
        chunked = batches.causal_lm_loss(model, packed, chunk_size=7)
        padded = model(**batches.collate_padded(examples, pad_id=0)).loss
    expected = sum(s for s, _ in alone) / sum(n for _, n in alone)
    torch.testing.assert_close(hf_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-5)

    # per-token losses of the packed row, split back per example, equal each example's own mean loss
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits[0, :-1]
    y = packed["labels"][0, 1:]
    tok = torch.nn.functional.cross_entropy(logits, y, reduction="none", ignore_index=IGNORE_INDEX)
    bounds = packed["cu_seq_lens_q"].tolist()
    for (s, e), (ref_sum, n) in zip(zip(bounds[:-1], bounds[1:]), alone):
        torch.testing.assert_close(tok[s:e - 1].sum() / n, ref_sum / n, rtol=1e-5, atol=1e-5)


def test_packed_equal_label_counts_is_plain_mean_of_example_losses():
    model = tiny_llama()
    examples = make_examples([10, 10, 10], prompt_frac=0.5)
    alone = per_example_sums(model, examples)
    with torch.no_grad():
        loss = model(**batches.collate_packed(examples), use_cache=False).loss
    torch.testing.assert_close(loss, sum(s / n for s, n in alone) / len(alone), rtol=1e-5, atol=1e-5)


def test_varlen_attention_gradients_match_sdpa_packed():
    varlen_attention.register_varlen_attention()
    packed = batches.collate_packed(make_examples([11, 6, 20]))
    grads = {}
    for attn in ("sdpa", varlen_attention.VARLEN_ATTENTION):
        model = tiny_llama(attn)
        model(**packed, use_cache=False).loss.backward()
        grads[attn] = model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(grads["sdpa"], grads[varlen_attention.VARLEN_ATTENTION], rtol=1e-4, atol=1e-6)


def test_packed_row_with_a_kv_cache_leaks_across_examples():
    """Why the train stage must run packed batches with use_cache=False (freeze_for_lora sets it)."""
    model = tiny_llama()
    packed = batches.collate_packed(make_examples([8, 8]))
    with torch.no_grad():
        with_cache = model(**packed, use_cache=True).loss
        without = model(**packed, use_cache=False).loss
    assert not torch.allclose(with_cache, without)


def test_cu_seqlens_derived_from_position_ids():
    batch = batches.collate_packed(make_examples([3, 5, 2]))
    cu, max_len = varlen_attention._cu_seqlens_from_position_ids(batch["position_ids"])
    assert cu.tolist() == [0, 3, 8, 10] and max_len == 5


# ------------------------------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_linear_ce_matches_standard_loss_and_grads(weight_grad):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_grad)
    labels = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    ref.backward()
    ref_h = hidden.grad.clone()
    ref_w = weight.grad.clone() if weight_grad else None
    hidden.grad = None
    weight.grad = None
    got = chunked_loss.fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    (got * 0.5).backward()  # the upstream gradient must be applied
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(hidden.grad, ref_h * 0.5)
    if weight_grad:
        torch.testing.assert_close(weight.grad, ref_w * 0.5)


def test_causal_lm_loss_matches_hf_loss_and_gradients_on_padded_batch():
    model = tiny_llama()
    batch = batches.collate_padded(make_examples([14, 8, 21]), pad_id=0)
    model(**batch).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss = model(**batch).loss.detach()
    model.zero_grad()
    loss = batches.causal_lm_loss(model, batch, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_causal_lm_loss_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    batch = batches.collate_packed(make_examples([9, 13]))
    with torch.no_grad():
        expected = peft_model(**batch, use_cache=False).loss
        torch.testing.assert_close(batches.causal_lm_loss(peft_model, batch), expected, rtol=1e-5, atol=1e-6)
    assert speedups.disable_lora_input_casting(peft_model) == 4


@pytest.mark.parametrize("style", ["torch-2.11", "later"])
def test_varlen_flash_adapts_to_the_installed_signature(monkeypatch, style):
    """The causal flag is is_causal in torch 2.10/2.11 and window_size=(-1, 0) later; GQA may need repeated kv."""
    from torch.nn.attention import varlen

    calls = {}

    def fake_211(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
        calls.update(causal=is_causal, heads=(q.shape[1], k.shape[1]))
        return varlen_attention._varlen_reference(q, k, v, cu_q, scale)

    def fake_later(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                   enable_gqa=False):
        calls.update(causal=tuple(window_size) == (-1, 0), heads=(q.shape[1], k.shape[1]), gqa=enable_gqa)
        return varlen_attention._varlen_reference(q, k, v, cu_q, scale)

    monkeypatch.setattr(varlen, "varlen_attn", fake_211 if style == "torch-2.11" else fake_later)
    varlen_attention._varlen_params.cache_clear()
    try:
        torch.manual_seed(0)
        q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
        cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        out = varlen_attention._varlen_flash(q, k, v, cu, 6, 8 ** -0.5)
    finally:
        varlen_attention._varlen_params.cache_clear()
    assert calls["causal"]
    assert calls["heads"] == ((4, 4) if style == "torch-2.11" else (4, 2))
    torch.testing.assert_close(out, varlen_attention._varlen_reference(q, k, v, cu, 8 ** -0.5))


# ----------------------------------------------------------------------------------- chunked loss in forward


def lora_llama(seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if "lora_B" in n:  # B starts at zero, which would make every lora_A gradient zero
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    chunked_loss.add_chunked_loss_forward(model.get_base_model(), chunk_size=7)
    return model


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_forward_equals_the_models_own_loss_through_peft():
    model = lora_llama()
    batch = batches.collate_padded(make_examples([14, 8, 21]), pad_id=0)
    n = batches.count_label_tokens(batch)
    for num_items in (None, 3 * n):
        model.zero_grad()
        ref = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
        ref.backward()
        ref_grads = lora_grads(model)
        model.zero_grad()
        out = model(**batch, use_cache=False, chunked_loss=True, num_items_in_batch=num_items)
        out.loss.backward()
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
        for name, grad in lora_grads(model).items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_chunked_loss_forward_refuses_a_model_it_would_score_wrongly():
    model = tiny_llama()
    model.config.logit_scale = 0.0625  # as Cohere: its forward scales the logits, which the chunked CE does not
    assert "logit_scale" in chunked_loss.chunked_loss_unsupported(model)
    with pytest.raises(ValueError, match="cannot reproduce this model's loss"):
        chunked_loss.add_chunked_loss_forward(model)


def _ddp_rank(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(lora_llama())
        batch = batches.collate_packed(make_examples([9, 13, 6], seed=10 + rank))
        model(**batch, use_cache=False, chunked_loss=True).loss.backward()
        torch.save(lora_grads(model.module), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_chunked_loss_runs_inside_ddp_so_gradients_are_averaged(tmp_path):
    """Computed inside the wrapped model's forward, the loss's gradients go through DDP's all-reduce: every rank ends
    with the mean of the ranks' gradients (calling the decoder next to DDP would leave each rank with its own)."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    synced = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    local = []
    for rank in range(world):
        model = lora_llama()
        model(**batches.collate_packed(make_examples([9, 13, 6], seed=10 + rank)), use_cache=False,
              chunked_loss=True).loss.backward()
        local.append(lora_grads(model))
    assert any(not torch.allclose(local[0][n], local[1][n]) for n in local[0])  # the ranks really differ
    for name in local[0]:
        mean = (local[0][name] + local[1][name]) / world
        for rank in range(world):
            torch.testing.assert_close(synced[rank][name], mean, rtol=1e-4, atol=1e-7, msg=name)
