"""stages/lib/training/fsdp.py: FSDP units per decoder layer and the adapter gathered from FSDP, on the CPU.

FSDP1 runs here with one gloo process (NO_SHARD: the same wrapping, hooks and gathers as on GPUs, without the
sharding; FULL_SHARD under gloo crashes on this CPU build). The sharded path is measured on GPUs
(benchmarks/bench_stage.py, issue 8)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from stages.lib.training import fsdp


@pytest.fixture
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir, use_safetensors=True)


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    # non-zero B: a gather that returned zeros or the wrong matrix would show
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            task_type="CAUSAL_LM"))


@contextlib.contextmanager
def one_process_group(port):
    import os

    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def wrap(model, policy, use_orig_params):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def test_layer_policy_makes_one_unit_per_decoder_layer_and_lora_still_learns(tiny_model, free_tcp_port):
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = lora_model(tiny_model)
    with one_process_group(free_tcp_port):
        wrapped = wrap(model, fsdp.layer_wrap_policy(model), use_orig_params=True)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        assert len(units) == 1 + tiny_model.config.num_hidden_layers  # the root + one per layer, none per LoRA matrix
        ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        assert all(not p.requires_grad and p.grad is None for n, p in wrapped.named_parameters() if "lora_" not in n)


def test_layer_units_train_exactly_like_peft_units(tiny_base_dir, free_tcp_port):
    """Same seed, data, dropout and reentrant checkpointing: the unit layout changes no number (one process, bf16,
    AdamW with clipping, as the stage trains under FSDP)."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecision
    from transformers import AutoModelForCausalLM

    def losses(policy):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, tie_word_embeddings=False).to(torch.bfloat16)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                                task_type="CAUSAL_LM"))
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        layer = policy == "layer"
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, auto_wrap_policy=fsdp.layer_wrap_policy(model) if layer else
                       fsdp_auto_wrap_policy(model), use_orig_params=layer, device_id=torch.device("cpu"),
                       mixed_precision=MixedPrecision(*(torch.bfloat16,) * 3))
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        data, out = torch.Generator().manual_seed(1), []
        for _ in range(4):
            ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=data)
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            wrapped.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    with one_process_group(free_tcp_port):
        layer, lora = losses("layer"), losses("lora")
    assert layer == lora and len(set(layer)) == 4  # equal, and the loss moved (training happened)


def test_layer_policy_gives_lora_the_frozen_weights_dtype(tiny_model):
    """A flat parameter holds one dtype: PEFT upcasts LoRA to float32 beside bf16 weights, the policy undoes it."""
    import torch

    model = lora_model(tiny_model.to(torch.bfloat16))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    fsdp.layer_wrap_policy(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_layer_policy_refuses_mixed_frozen_dtypes_and_models_without_layer_names(tiny_model):
    import torch

    model = lora_model(tiny_model)
    model.get_base_model().model.norm.weight.data = model.get_base_model().model.norm.weight.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match="frozen weights in several dtypes"):
        fsdp.layer_wrap_policy(model)
    tiny_model._no_split_modules = []
    with pytest.raises(ValueError, match="no decoder layer class.*fsdp_wrap: lora"):
        fsdp.layer_wrap_policy(tiny_model)


@pytest.mark.parametrize("policy", ["layer", "lora"])
def test_gathered_adapter_is_saved_as_trained_and_loads_like_peft_saved_it(tiny_model, tiny_base_dir, tmp_path,
                                                                           free_tcp_port, policy):
    """Both unit layouts (LoRA inside the layer's unit with orig params; PEFT's unit per LoRA matrix with flat
    params): every LoRA weight comes back equal to what FSDP trained, is written under PEFT's own keys (which PEFT
    cannot work out once FSDP has renamed its modules) and loads into a fresh model."""
    import json

    import torch
    from peft import PeftModel
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if policy == "layer":
        # one process is NO_SHARD, where torch's use_orig_params breaks on tied weights (so the stage uses PEFT's
        # units there: fsdp.choose_units); the gather itself is what is checked here
        tiny_model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, tie_word_embeddings=False)
    model = lora_model(tiny_model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keys = fsdp.adapter_file_keys(model)
    model.save_pretrained(str(tmp_path / "peft"))  # PEFT's own files, before any wrapping
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with one_process_group(free_tcp_port):
        if policy == "layer":
            wrapped = wrap(model, fsdp.layer_wrap_policy(model), use_orig_params=True)
        else:
            wrapped = wrap(model, fsdp_auto_wrap_policy(model), use_orig_params=False)
        ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
        # the Trainer's order: a step, then the final evaluation, then the gather
        optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            wrapped(input_ids=ids, labels=ids)
        after = fsdp.gather_full_params(wrapped, names)
        with pytest.raises(RuntimeError, match="not found in any unit"):
            fsdp.gather_full_params(wrapped, [*names, "base_model.model.no_such.weight"])
        fsdp.save_adapter(model, after, keys, tmp_path / "fsdp")
    assert sorted(after) == sorted(names) and len(names) == 4 * tiny_model.config.num_hidden_layers
    assert all(after[n].device.type == "cpu" and after[n].shape == before[n].shape for n in names)
    assert all(not torch.equal(after[n], before[n]) for n in names)  # the trained values, not a stale copy
    ours, peft_own = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(peft_own) and len(ours) == len(names)
    config = json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # PEFT writes target_modules in set order (PYTHONHASHSEED); ours is sorted, otherwise the same file
    assert config["target_modules"] == sorted(peft_config["target_modules"])
    assert {**config, "target_modules": None} == {**peft_config, "target_modules": None}
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), str(tmp_path / "fsdp"))
    loaded = dict(fresh.named_parameters())
    assert all(torch.equal(loaded[n], after[n]) for n in names)


def test_save_adapter_refuses_a_gather_that_does_not_match_the_model(tiny_model, tmp_path):
    model = lora_model(tiny_model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keys = fsdp.adapter_file_keys(model)
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=f"{len(names) - 1} tensors for {len(names)} parameters"):
        fsdp.save_adapter(model, dict(list(state.items())[1:]), keys, tmp_path / "a")
    with pytest.raises(ValueError, match="unknown"):
        fsdp.save_adapter(model, {**state, "stray.weight": state[names[0]]}, keys, tmp_path / "b")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_layer_units_are_used_only_where_fsdp_shards():
    assert fsdp.choose_units("layer", 2) == "layer" and fsdp.choose_units("layer", 8) == "layer"
    assert fsdp.choose_units("layer", 1) == "lora"  # NO_SHARD: nothing to gain, and tied weights break
    assert fsdp.choose_units("lora", 4) == "lora"


def test_gather_refuses_a_model_fsdp_did_not_wrap(tiny_model):
    with pytest.raises(ValueError, match="not wrapped in FSDP"):
        fsdp.gather_full_params(tiny_model, [])


def test_layer_units_applies_the_policy_after_the_trainers_fsdp_setup_and_restores_it(tiny_model, monkeypatch):
    import transformers.trainer as hf_trainer

    calls = []
    monkeypatch.setattr(hf_trainer, "update_fsdp_plugin_peft", lambda model, acc: calls.append("peft"))
    original = hf_trainer.update_fsdp_plugin_peft
    plugin = SimpleNamespace(auto_wrap_policy="peft's", use_orig_params=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    model = lora_model(tiny_model)
    with fsdp.layer_units():
        hf_trainer.update_fsdp_plugin_peft(model, accelerator)
    assert calls == ["peft"]  # the Trainer's own step still runs (it sets the 4-bit storage dtype)
    assert plugin.use_orig_params is True and plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {
        type(tiny_model.model.layers[0])}
    assert hf_trainer.update_fsdp_plugin_peft is original


def test_layer_units_names_a_transformers_without_the_hook(monkeypatch):
    import transformers.trainer as hf_trainer

    monkeypatch.delattr(hf_trainer, "update_fsdp_plugin_peft")
    with pytest.raises(RuntimeError, match="fsdp_wrap: lora"):
        with fsdp.layer_units():
            pass
