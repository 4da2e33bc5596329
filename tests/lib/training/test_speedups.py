"""Speed levers in the train stage: auto leaves the CPU path alone, and forced on (chunked CE, varlen attention
through its CPU reference, no fp32 upcast) they give the trainer the same loss and LoRA gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import ROOT, Probe, assert_only_lora_changed, make_args

LEVERS_ON = {"attention": "varlen", "chunked_loss": True, "upcast_frozen": False}
NO_DROPOUT = {"dropout": 0.0}  # the two paths must see the same network


def train_params(**overrides):
    from stages.lib.config import TrainParams

    return TrainParams(**overrides)


def precision(device: str, dtype: str = "float32"):
    from stages.lib.model.precision import Precision

    return Precision(device, dtype, "none", "test")


# ------------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("device,dtype,train,kernel,expected", [
    ("cpu", "float32", {}, True, ("sdpa", True, True, True)),
    ("cpu", "float32", {"packing": True}, True, ("sdpa", True, True, True)),
    ("cuda", "bfloat16", {"packing": True}, True, ("varlen", True, False, False)),
    ("cuda", "bfloat16", {}, True, ("sdpa", True, False, False)),
    ("cuda", "bfloat16", {"packing": True}, False, ("sdpa", True, False, False)),
    ("cuda", "bfloat16", {"packing": True, "distributed": "fsdp", "num_processes": 2}, True,
     ("varlen", False, False, False)),
    ("cuda", "float32", {"packing": True}, True, ("sdpa", True, False, True)),
    ("cuda", "float16", {"packing": True}, True, ("varlen", True, False, False)),
    ("cuda", "bfloat16", {"packing": True, "attention": "sdpa", "chunked_loss": False, "upcast_frozen": True}, True,
     ("sdpa", False, True, True)),
    ("cpu", "float32", {"packing": True, **LEVERS_ON}, True, ("varlen", True, False, True)),
])
def test_auto_resolves_per_device(device, dtype, train, kernel, expected):
    from stages.lib.training.speedups import resolve_speedups

    got = resolve_speedups(train_params(**train), precision(device, dtype), varlen_kernel=kernel)
    assert (got.attention, got.chunked_loss, got.upcast_frozen, got.cast_lora_inputs) == expected
    assert got.reason
    assert got.as_dict()["loss_chunk_tokens"] == (1024 if got.chunked_loss else None)


def test_params_yaml_defaults_give_the_committed_cpu_path():
    """The CPU default run's numbers are committed: auto must give the path they were made with (SDPA, the
    chunked loss, PEFT's fp32 preparation of frozen weights)."""
    from stages.lib.config import load_params
    from stages.lib.training.speedups import resolve_speedups

    train = load_params(ROOT / "params.yaml", ("train",))["train"]
    got = resolve_speedups(train, precision("cpu"))
    assert (got.attention, got.chunked_loss, got.upcast_frozen, got.cast_lora_inputs) == ("sdpa", True, True, True)


@pytest.mark.parametrize("train,message", [
    ({"attention": "flash"}, r"attention must be auto, sdpa or varlen, got 'flash'"),
    ({"attention": "varlen"}, r"attention: varlen acts on packed rows only; set packing: true"),
    ({"chunked_loss": "yes"}, r"chunked_loss must be auto, true or false, got 'yes'"),
    ({"upcast_frozen": 1}, r"upcast_frozen must be auto, true or false, got 1"),
    ({"chunked_loss": True, "distributed": "fsdp", "num_processes": 2}, r"chunked_loss: true .* FSDP shards"),
    ({"upcast_frozen": True, "distributed": "fsdp", "num_processes": 2}, r"upcast_frozen: true .* FSDP cannot"),
    ({"fsdp_wrap": "auto"}, r"fsdp_wrap must be layer .* or lora .*, got 'auto'"),
])
def test_impossible_lever_params_are_named(train, message):
    from stages.lib.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[train\]: " + message):
        train_params(**train)


def test_varlen_forced_without_the_kernel_is_an_error():
    from stages.lib.config import ConfigError
    from stages.lib.training.speedups import resolve_speedups

    with pytest.raises(ConfigError, match="attention: varlen needs torch.nn.attention.varlen"):
        resolve_speedups(train_params(packing=True, attention="varlen"), precision("cuda", "bfloat16"),
                         varlen_kernel=False)


@pytest.mark.parametrize("requested", ["auto", True])
def test_chunked_loss_refused_for_a_model_that_transforms_its_logits(tiny_base_dir, requested):
    from transformers import AutoModelForCausalLM

    from stages.lib.config import ConfigError
    from stages.lib.training.setup import apply_speedups
    from stages.lib.training.speedups import resolve_speedups

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    model.config.logit_scale = 0.0625  # as Cohere: the chunked CE would score the wrong logits
    train = train_params(chunked_loss=requested)
    levers = resolve_speedups(train, precision("cuda", "bfloat16"), varlen_kernel=True)
    assert levers.chunked_loss
    if requested is True:
        with pytest.raises(ConfigError, match="chunked_loss: true, but the model transforms its logits"):
            apply_speedups(model, levers, train)
    else:
        levers = apply_speedups(model, levers, train)
        assert not levers.chunked_loss and "logit_scale" in levers.reason


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_frozen_decides_the_dtype_of_frozen_weights(tiny_base_dir, upcast):
    """prepare_model_for_kbit_training upcasts bf16 norms/embeddings to fp32; freeze_for_lora only freezes."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.lib.model.precision import Precision
    from stages.lib.training.setup import freeze_base
    from stages.lib.training.speedups import resolve_speedups

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16)
    train = train_params(upcast_frozen=upcast, gradient_checkpointing=True)
    levers = resolve_speedups(train, precision("cuda", "bfloat16"), varlen_kernel=True)
    model = freeze_base(model, Precision("cuda", "bfloat16", "nf4", "test"), train, levers)
    assert not any(p.requires_grad for p in model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == ({torch.float32} if upcast else {torch.bfloat16})
    if not upcast:  # (PEFT turns checkpointing on only for a model that really is 4/8-bit)
        assert model.is_activation_checkpointing and not model.config.use_cache


# --------------------------------------------------------------------------------------- the trainer's loss


def build_trainer(ws, name: str, train: dict):
    """The stage's own model and trainer set-up (training/setup.py's phases, as stages.train.main runs them), on CPU."""
    import torch
    from datasets import load_from_disk

    from stages import train as stage
    from stages.lib.config import load_params
    from stages.lib.model.loading import load_tokenizer
    from stages.lib.model.precision import resolve_precision
    from stages.lib.training import setup
    from stages.lib.training.speedups import resolve_speedups

    args = make_args(ws, name, lora=NO_DROPOUT, train={"eval_steps": 0, **train})
    params = load_params(args.params, stage.PARAMS)
    lora, quant, tp = params["lora"], params["quant"], params["train"]
    prec = resolve_precision(quant, 0, "cpu")
    levers = resolve_speedups(tp, prec)
    model, peft_config, levers = setup.prepare_model(args.base, prec, quant, tp, lora, levers)
    train_ds = load_from_disk(str(Path(args.tokenized) / "train"))
    max_length = max(len(ids) for ids in train_ds["input_ids"])
    sft_args = setup.build_sft_config(tp, prec, Path(args.checkpoints) / name, max_length, resume=False)
    trainer = setup.build_trainer(levers, prec, model=model, args=sft_args, train_dataset=train_ds,
                                  processing_class=load_tokenizer(args.base), peft_config=peft_config)
    # LoRA B starts at zero, which would leave every A gradient zero: the same random adapter in both paths
    gen = torch.Generator().manual_seed(0)
    for n, p in sorted(trainer.model.named_parameters()):
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    trainer.model.train()
    return trainer, levers


def loss_and_lora_grads(trainer, batch, num_items=None):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(standard, fast, batch, num_items=None):
    import torch

    ref_loss, ref_grads = loss_and_lora_grads(standard, batch, num_items)
    loss, grads = loss_and_lora_grads(fast, batch, num_items)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys() and any(g.abs().sum() > 0 for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    return loss


def test_chunked_loss_on_a_padded_batch_equals_trl_loss_and_gradients(workspace):
    standard, _ = build_trainer(workspace, "std_padded", {})
    fast, levers = build_trainer(workspace, "fast_padded", {"chunked_loss": True, "upcast_frozen": False})
    assert levers.chunked_loss and "ChunkedLossSFTTrainer" in [c.__name__ for c in type(fast).__mro__]
    batch = next(iter(standard.get_train_dataloader()))
    assert "attention_mask" in batch and (batch["attention_mask"] == 0).any()  # padding is really there
    assert_same_loss_and_grads(standard, fast, batch)
    # gradient accumulation: the trainer divides by the label tokens of the whole step, not this micro-batch's
    n = int((batch["labels"][:, 1:] != -100).sum())
    half = assert_same_loss_and_grads(standard, fast, batch, num_items=2 * n)
    full, _ = loss_and_lora_grads(fast, batch)
    assert float(half) == pytest.approx(float(full) / 2, rel=1e-5)


def test_levers_on_a_packed_batch_equal_trl_loss_and_the_per_example_losses(workspace):
    import torch

    standard, _ = build_trainer(workspace, "std_packed", {"packing": True})
    fast, levers = build_trainer(workspace, "fast_packed", {"packing": True, **LEVERS_ON})
    assert levers.attention == "varlen" and levers.chunked_loss
    assert fast.model.get_base_model().config._attn_implementation == "varlen_sdpa"
    batch = next(iter(standard.get_train_dataloader()))
    assert "attention_mask" not in batch and "cu_seq_lens_q" in batch
    packed = assert_same_loss_and_grads(standard, fast, batch)

    # each example alone (TRL's path, no packing): the packed loss is their token-weighted mean
    bounds = batch["cu_seq_lens_q"].tolist()
    assert len(bounds) > 2
    total, count = 0.0, 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        ids, labels = batch["input_ids"][:, s:e], batch["labels"][:, s:e]
        alone = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            loss = standard.compute_loss(standard.model, alone)
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    assert float(packed) == pytest.approx(total / count, rel=1e-5)

    # generation goes through the patched forward without chunked_loss: unchanged
    with torch.no_grad():
        out = fast.model.generate(input_ids=batch["input_ids"][:, :5], max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 7)


def test_two_steps_with_levers_on_change_only_lora_and_record_them(workspace):
    from stages import train as stage

    probe = Probe()
    args = make_args(workspace, "levers_on", train={"max_steps": 2, "save_steps": 10, "packing": True, **LEVERS_ON})
    metrics = stage.main(args, callbacks=[probe])
    assert_only_lora_changed(probe)
    assert metrics["global_step"] == 2 and 0 < metrics["eval_loss"] < 20
    levers = metrics["speedups"]
    assert (levers["attention"], levers["chunked_loss"], levers["upcast_frozen"]) == ("varlen", True, False)
    assert yaml.safe_load(Path(args.run_report).read_text())["speedups"] == levers
