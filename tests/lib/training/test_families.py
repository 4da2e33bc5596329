"""Each decoder family (stages/lib/testing/families.py) with each training lever: LoRA targets resolved from the
family's own module names, the chunked loss equal to the model's own loss (Gemma's soft-capping included), packed
sequences kept apart, varlen attention equal to SDPA (sliding windows included) or refused with the reason."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stages.lib.config import ConfigError, LoraParams, TrainParams  # noqa: E402
from stages.lib.model.chat import IGNORE_INDEX  # noqa: E402
from stages.lib.model.precision import Precision  # noqa: E402
from stages.lib.testing import batches  # noqa: E402
from stages.lib.testing.families import FAMILIES, family_model, family_tokenizer  # noqa: E402
from stages.lib.training import chunked_loss, varlen_attention  # noqa: E402

NAMES = sorted(FAMILIES)
WINDOWED = ("gemma3", "mistral")  # sliding_window 16 in the tiny configs


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    fam = FAMILIES[request.param]
    return fam, family_model(fam, family_tokenizer(fam)).eval()


def examples(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(8, vocab, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    return out


def test_all_linear_and_a_named_list_resolve_to_the_familys_modules(family):
    from peft import get_peft_model

    from stages.lib.training.lora import build_lora_config, linear_module_names, resolve_target_modules

    fam, model = family
    assert linear_module_names(model) == list(fam.linear_modules)
    assert resolve_target_modules(LoraParams(target_modules=list(fam.named_targets)), model) == \
        list(fam.named_targets)
    for targets in ("all-linear", list(fam.named_targets)):
        import copy

        peft = get_peft_model(copy.deepcopy(model), build_lora_config(LoraParams(target_modules=targets), model))
        adapted = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
        assert adapted == set(fam.linear_modules if targets == "all-linear" else fam.named_targets)


def test_a_module_name_the_family_lacks_is_refused_with_the_ones_it_has(family):
    from stages.lib.training.lora import resolve_target_modules

    fam, model = family
    foreign = "q_proj" if "q_proj" not in fam.linear_modules else "query_key_value"
    with pytest.raises(ConfigError, match=rf"\['{foreign}'\] not found in {fam.architecture}; linear modules "
                                          rf"available: \[{', '.join(repr(m) for m in fam.linear_modules)}\]"):
        resolve_target_modules(LoraParams(target_modules=[foreign, fam.named_targets[0]]), model)


def test_chunked_loss_equals_the_models_own_loss_and_gradients(family):
    fam, model = family
    assert chunked_loss.chunked_loss_unsupported(model) is None
    batch = batches.collate_padded(examples([21, 9, 14], model.config.vocab_size), pad_id=0)
    hidden_grads = {}
    for name, loss_of in (("model", lambda: model(**batch, use_cache=False).loss),
                          ("chunked", lambda: batches.causal_lm_loss(model, batch, chunk_size=5))):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        hidden_grads[name] = (loss.detach(), model.get_output_embeddings().weight.grad.clone(),
                              model.get_input_embeddings().weight.grad.clone())
    for ref, got in zip(hidden_grads["model"], hidden_grads["chunked"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_gemma_soft_capping_is_what_makes_the_chunked_loss_right():
    """Without the cap the chunked CE scores other logits: the equality above is not a tautology."""
    fam = FAMILIES["gemma3"]
    model = family_model(fam, family_tokenizer(fam)).eval()
    assert chunked_loss.logit_softcap(model) == 30.0
    # large hidden states push logits into tanh's bend, where capping matters
    model.get_output_embeddings().weight.data.mul_(40)
    batch = batches.collate_padded(examples([21, 9], model.config.vocab_size), pad_id=0)
    with torch.no_grad():
        own = model(**batch, use_cache=False).loss
        capped = batches.causal_lm_loss(model, batch)
        model.config.final_logit_softcapping = None
        uncapped = batches.causal_lm_loss(model, batch)
    torch.testing.assert_close(capped, own, rtol=1e-4, atol=1e-5)
    assert (uncapped - own).abs() > 0.1


def test_packed_sequences_stay_apart(family):
    from stages.lib.training.checks import packing_supported

    fam, model = family
    assert packing_supported(model)
    exs = examples([30, 9, 25], model.config.vocab_size, seed=1)  # longer than the sliding windows
    with torch.no_grad():
        packed = model(**batches.collate_packed(exs), use_cache=False).loss
        padded = model(**batches.collate_padded(exs, pad_id=0), use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "falcon"])
def test_varlen_attention_equals_sdpa_on_packed_rows(name):
    """The CPU reference of the varlen kernel (the kernel itself needs CUDA) against SDPA's block mask, with
    sequences longer than the sliding windows of Mistral and Gemma 3."""
    fam = FAMILIES[name]
    tokenizer = family_tokenizer(fam)
    model = family_model(fam, tokenizer).eval()
    assert varlen_attention.varlen_unsupported(model) is None
    packed = batches.collate_packed(examples([30, 9, 25], len(tokenizer), seed=2), varlen_kwargs=False)
    with torch.no_grad():
        sdpa = model(**packed, use_cache=False).logits
        model.set_attn_implementation(varlen_attention.register_varlen_attention())
        varlen = model(**packed, use_cache=False).logits
    torch.testing.assert_close(varlen, sdpa, rtol=1e-4, atol=1e-5)
    if name in WINDOWED:
        # the window matters at these lengths: the varlen path without it gives other logits
        real = varlen_attention._varlen_reference
        try:
            varlen_attention._varlen_reference = lambda q, k, v, cu, scale, window=None: real(q, k, v, cu, scale)
            with torch.no_grad():
                unwindowed = model(**packed, use_cache=False).logits
        finally:
            varlen_attention._varlen_reference = real
        assert (unwindowed - sdpa).abs().max() > 1e-3


@pytest.mark.parametrize("requested", ["auto", "varlen"])
def test_varlen_on_falcon_falls_back_to_sdpa_or_is_refused(requested):
    from stages.lib.training.setup import apply_speedups
    from stages.lib.training.speedups import resolve_speedups

    fam = FAMILIES["falcon"]
    model = family_model(fam, family_tokenizer(fam))
    train = TrainParams(attention=requested, packing=True)
    levers = resolve_speedups(train, Precision("cuda", "bfloat16", "none", "test"), varlen_kernel=True)
    assert levers.attention == "varlen"
    if requested == "varlen":
        with pytest.raises(ConfigError, match="attention: varlen, but FalconForCausalLM does not call its attention "
                                              "through transformers' AttentionInterface"):
            apply_speedups(model, levers, train)
        return
    levers = apply_speedups(model, levers, train)
    assert levers.attention == "sdpa" and "AttentionInterface" in levers.reason
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_attention.varlen_available(),
                    reason="the flash varlen kernel needs CUDA")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "falcon"])
def test_flash_varlen_kernel_equals_sdpa_in_bf16(name):
    """On a GPU, the kernel itself (window_size=(W - 1, 0) for the sliding layers) against SDPA's mask."""
    fam = FAMILIES[name]
    tokenizer = family_tokenizer(fam)
    model = family_model(fam, tokenizer).eval().to("cuda", torch.bfloat16)
    packed = {k: v.to("cuda") if hasattr(v, "to") else v
              for k, v in batches.collate_packed(examples([60, 9, 45], len(tokenizer), seed=3)).items()}
    with torch.no_grad():
        sdpa = model(**packed, use_cache=False).logits.float()
        model.set_attn_implementation(varlen_attention.register_varlen_attention())
        varlen = model(**packed, use_cache=False).logits.float()
    err = (varlen - sdpa).abs().mean()
    assert err < 0.01 * sdpa.abs().mean()
    if name in WINDOWED:  # the kernel without the window is far off: the window is what makes it agree
        real = varlen_attention._varlen_flash
        try:
            varlen_attention._varlen_flash = lambda q, k, v, cu, n, scale, window=None: real(q, k, v, cu, n, scale)
            with torch.no_grad():
                unwindowed = model(**packed, use_cache=False).logits.float()
        finally:
            varlen_attention._varlen_flash = real
        assert (unwindowed - sdpa).abs().mean() > 5 * err
    # the chunked loss in bf16 against the model's own
    batch = {k: v.to("cuda") for k, v in batches.collate_padded(examples([40, 20], len(tokenizer)), 0).items()}
    with torch.no_grad():
        torch.testing.assert_close(batches.causal_lm_loss(model, batch).float(),
                                   model(**batch, use_cache=False).loss.float(), rtol=2e-2, atol=2e-2)


def test_4bit_layers_keep_their_backward_on_cpu_after_an_evaluation(tmp_path):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward after one eval-mode forward
    (on AVX512-BF16 CPUs); the train stage turns that off, so gradients still reach the input of every layer."""
    from stages.lib.model.loading import load_base_model
    from stages.lib.testing.families import write_family_base
    from stages.lib.training.setup import keep_4bit_weights_trainable_on_cpu

    model = load_base_model(write_family_base("qwen2", tmp_path / "qwen2"), Precision("cpu", "float32", "nf4", "t"))
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    assert keep_4bit_weights_trainable_on_cpu(model) > 0
    ids = torch.randint(8, model.config.vocab_size, (1, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()  # the biased q/k/v layers used to fail here
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
