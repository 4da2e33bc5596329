"""train stage on the tiny model: LoRA-only updates, completion-only batches, resume, NF4, outputs, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from argparse import Namespace

from helpers import ROOT, Probe, adapter_tensors, assert_only_lora_changed, make_args, save_cut_short


def test_two_steps_train_lora_only_and_batches_mask_the_prompt(workspace, tiny_tokenizer):
    from stages import train as stage

    probe = Probe()
    args = make_args(workspace, "two_steps", train={"max_steps": 2, "save_steps": 10})
    metrics = stage.main(args, callbacks=[probe])
    assert_only_lora_changed(probe)

    # the batch the trainer's own collator built: prompt masked, answers and their stop token learned, pad masked
    batch = probe.batch
    eos = tiny_tokenizer.eos_token_id
    pad = tiny_tokenizer.pad_token_id
    assert pad != eos
    assert "attention_mask" in batch
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = ids[mask.bool()].tolist()
        lab = labels[mask.bool()].tolist()
        first = next(i for i, t in enumerate(lab) if t != -100)
        assert tiny_tokenizer.decode(real[:first]).endswith("<|im_start|>assistant\n")
        assert lab[first:] == real[first:]
        assert (labels[~mask.bool()] == -100).all()
        if len(real) < 128:  # not truncated
            assert lab[-1] == eos

    assert metrics["global_step"] == 2 and metrics["steps_this_run"] == 2
    assert metrics["base_eval_loss"] > 0 and metrics["eval_loss"] > 0
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert 0 < metrics["trainable_percent"] < 100 and metrics["trainable_params"] > 0
    assert metrics["precision"]["device"] == "cpu" and metrics["precision"]["quant"] == "none"
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    assert "libraries" in metrics["metadata"]
    on_disk = json.loads(Path(args.run_report).read_text())
    assert on_disk["run_key"] == metrics["run_key"] and on_disk["stage_wall_seconds"] > 0
    # the metrics file `dvc exp show` reads holds the compared numbers only; timings and provenance are in the report
    headline = json.loads(Path(args.metrics).read_text())
    assert set(headline) == {"eval_perplexity", "base_eval_perplexity", "perplexity_change", "eval_loss", "train_loss"}
    assert headline["eval_perplexity"] == metrics["eval_perplexity"]


def test_adapter_is_peft_format_and_records_base(workspace, tiny_base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = make_args(workspace, "two_steps")
    adapter = Path(args.out)  # written by the previous test; rebuilt here if run alone
    if not adapter.is_dir():
        from stages import train as stage

        stage.main(make_args(workspace, "two_steps", train={"max_steps": 2, "save_steps": 10}))
    info = json.loads((adapter / "training.json").read_text())
    assert info["base_checksum"] == "ab" * 32
    assert info["precision"]["dtype"] == "float32"
    marker = json.loads((adapter / "base_model.json").read_text())
    assert marker["weights_sha256"] == "ab" * 32
    assert "prompt_format" not in marker  # chat, the default: the marker keeps its bytes from before the param
    assert "LoRA adapter" in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(workspace["base"], use_safetensors=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, adapter)
        after = model(ids).logits
    assert not torch.allclose(before, after), "the adapter changes nothing"


def adapter_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_adapter_bytes_do_not_depend_on_hash_seed_or_run_time(workspace):
    """models/adapter is a DVC-cached output: two fresh trainings of the same inputs, in processes with different
    PYTHONHASHSEED (PEFT keeps target_modules in a set) and at different times, write byte-identical files."""
    import os
    import subprocess
    import sys

    outs = []
    for seed in ("1", "2"):
        args = make_args(workspace, f"hashseed_{seed}", checkpoints=f"ckpt_hashseed_{seed}",
                         lora={"target_modules": ["v_proj", "q_proj", "k_proj", "o_proj"]})
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()]
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "stages.train", *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(adapter_bytes(args.out))
    assert set(outs[0]) >= {"adapter_model.safetensors", "adapter_config.json", "training.json", "README.md"}
    assert [name for name in outs[0] if outs[0][name] != outs[1].get(name)] == []
    config = json.loads(outs[0]["adapter_config.json"])
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "runtime" not in outs[0]["training.json"].decode() and "per_second" not in outs[0]["training.json"].decode()


def test_packing_batches_are_padding_free_and_masked(workspace, tiny_tokenizer):
    from stages import train as stage
    from stages.lib.training import checkpoints

    probe = Probe()
    listing = sorted(p.relative_to(workspace["tokenized"]) for p in workspace["tokenized"].rglob("*"))
    digest = checkpoints.data_digest(workspace["tokenized"])
    stage.main(make_args(workspace, "packed", train={"max_steps": 1, "packing": True, "eval_steps": 0}),
               callbacks=[probe])
    # packing maps the dataset: no cache file may land in data/tokenized (a DVC output; it would also change the
    # run key, so a rerun would never resume its checkpoints)
    assert sorted(p.relative_to(workspace["tokenized"]) for p in workspace["tokenized"].rglob("*")) == listing
    assert checkpoints.data_digest(workspace["tokenized"]) == digest
    batch = probe.batch
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert len(starts) >= 2  # several examples in one row, positions restart per example
    labels = batch["labels"][0].tolist()
    ids = batch["input_ids"][0].tolist()
    for start, end in zip(starts, starts[1:] + [len(pos)]):
        lab = labels[start:end]
        first = next(i for i, t in enumerate(lab) if t != -100)
        assert tiny_tokenizer.decode(ids[start:start + first]).endswith("<|im_start|>assistant\n")


def test_resume_continues_from_last_checkpoint_and_matches(workspace):
    import torch

    from stages import train as stage
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")

    full = make_args(workspace, "uninterrupted", checkpoints="ckpt_full", train={"report_to": "dvclive"})
    stage.main(full)
    cut = make_args(workspace, "interrupted", checkpoints="ckpt_cut", train={"report_to": "dvclive"})
    with pytest.raises(KeyboardInterrupt):
        stage.main(cut, callbacks=[Crash()])
    assert not Path(cut.out).exists()  # nothing half-written
    metrics = stage.main(cut)
    assert metrics["resumed_from_step"] == 2 and metrics["steps_this_run"] == 2 and metrics["global_step"] == 4
    a, b = adapter_tensors(full.out), adapter_tensors(cut.out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert metrics["base_eval_loss"] == pytest.approx(json.loads(Path(full.run_report).read_text())["base_eval_loss"])

    # the dvclive history is whole after the resume: step-0 (base) and every eval, per-step train loss
    def steps(path):
        return [int(line.split("\t")[-2]) for line in Path(path).read_text().splitlines()[1:]]

    live = Path(cut.live) / "plots" / "metrics"
    assert steps(live / "eval" / "loss.tsv") == [0, 2, 4]
    assert steps(live / "train" / "loss.tsv") == [1, 2, 3, 4]


def test_rerun_of_a_finished_checkpoint_trains_no_extra_step(workspace):
    """`dvc repro -f` with the persisted checkpoints: the Trainer would take one more step past max_steps (at a
    non-zero lr with a constant schedule that changes the adapter); the stage reuses the finished run instead."""
    import shutil

    import torch

    from stages import train as stage

    train = {"lr_scheduler": "constant", "max_steps": 2, "save_steps": 2, "report_to": "dvclive"}
    args = make_args(workspace, "finished", checkpoints="ckpt_finished", train=train)
    first = stage.main(args)
    before = adapter_tensors(args.out)
    files_before = adapter_bytes(args.out)
    shutil.rmtree(args.out)
    shutil.rmtree(args.live)  # dvc deletes outputs before rerunning a stage
    again = stage.main(args)
    assert again["reused_completed_run"] and again["steps_this_run"] == 0
    assert again["global_step"] == first["global_step"] == 2
    # the finished run's timing and memory, not a fake zero or this process's load-and-evaluate
    for key in ("train_seconds", "steps_per_second", "tokens_per_second", "peak_memory_mb"):
        assert again[key] == first[key], key
    assert again["resumed_from_step"] == 2
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
    after = adapter_tensors(args.out)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    # a cached output: reusing the finished run writes the same bytes as the run that finished it
    files_after = adapter_bytes(args.out)
    assert [name for name in files_before if files_before[name] != files_after.get(name)] == []
    loss_steps = [line.split("\t")[-2] for line in
                  (Path(args.live) / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert loss_steps == ["1", "2"]  # plots rebuilt from the restored history


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_falls_back(workspace, caplog):
    """The issue's fault: the newest checkpoint's safetensors cut short (a crash, a kill or a full disk during a save
    by an older version). That checkpoint is finished, so it would be reused; the stage names it, sets it aside and
    resumes from the one before, ending where an undamaged run ends."""
    import logging

    import torch

    from stages import train as stage

    args = make_args(workspace, "damaged", checkpoints="ckpt_damaged", train={"max_steps": 6})
    first = stage.main(args)
    run = Path(args.checkpoints) / first["run_key"]
    # the Trainer's rotation (save_total_limit 2) still runs over the checkpoints renamed into place
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-6"]
    weights = run / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # safetensors then says "invalid header length"
    trained = adapter_tensors(args.out)
    with caplog.at_level(logging.WARNING):
        again = stage.main(args)
    assert f"checkpoint {run / 'checkpoint-6'} is damaged (adapter_model.safetensors: unreadable safetensors" \
           in caplog.text and "set aside as damaged-checkpoint-6-1" in caplog.text
    assert f"falling back to {run / 'checkpoint-4'}" in caplog.text
    assert not again["reused_completed_run"]
    assert again["resumed_from_step"] == 4 and again["steps_this_run"] == 2 and again["global_step"] == 6
    for name, tensor in adapter_tensors(args.out).items():
        torch.testing.assert_close(tensor, trained[name], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-6",
                                                                    "damaged-checkpoint-6-1"]
    assert len((run / "damaged-checkpoint-6-1" / "adapter_model.safetensors").read_bytes()) == 100  # kept as found


KILLED_MID_SAVE = """
import os, signal, sys
import torch
import helpers
# the step-4 checkpoint's optimizer state half written, then the process killed (no handler runs)
torch.save = helpers.save_cut_short(torch.save, os.path.join("checkpoint-4", "optimizer.pt"),
                                    lambda: os.kill(os.getpid(), signal.SIGKILL))
from stages import train
train.main(train.build_parser().parse_args(sys.argv[1:]))
"""


def test_a_kill_mid_save_leaves_the_previous_checkpoint_and_the_rerun_resumes_it(workspace, caplog):
    import logging
    import os
    import signal
    import subprocess
    import sys

    from stages import train as stage

    args = make_args(workspace, "killed", checkpoints="ckpt_killed")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (run,) = Path(args.checkpoints).iterdir()
    # no half-written checkpoint-4 for the Trainer's lookup to find: step 2 is the newest
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run / ".partial" / "checkpoint-4" / "optimizer.pt").is_file()  # the kill did land mid-save
    assert not Path(args.out).exists()

    with caplog.at_level(logging.WARNING):
        metrics = stage.main(args)
    assert f"removing {run / '.partial'}: a checkpoint save that did not finish" in caplog.text
    assert metrics["resumed_from_step"] == 2 and metrics["steps_this_run"] == 2 and metrics["global_step"] == 4
    assert not (run / ".partial").exists()


def test_a_full_disk_mid_save_names_the_checkpoint_and_keeps_the_previous_one(workspace, monkeypatch):
    import errno

    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from stages import train as stage
    from stages.lib.training import checkpoints

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_cut_short(torch.save, "checkpoint-4/optimizer.pt", full_disk))
    args = make_args(workspace, "full_disk", checkpoints="ckpt_full_disk")
    with pytest.raises(OSError) as caught:
        stage.main(args)
    (run,) = Path(args.checkpoints).iterdir()
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"[Errno {errno.ENOSPC}] cannot write {run / 'checkpoint-4'}: No space left "
                                        "on device (")
    assert "MiB free on that disk" in str(caught.value)
    # the half-written save is gone (its space freed); step 2 is the newest checkpoint, whole; no output written
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert checkpoints.checkpoint_problem(run / "checkpoint-2") is None
    assert not Path(args.out).exists() and not Path(args.metrics).exists()


def test_out_of_memory_in_training_ends_with_the_params_to_lower(workspace, monkeypatch):
    import traceback

    import torch
    from transformers.models.llama import modeling_llama

    from stages import train as stage

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", no_memory)
    args = make_args(workspace, "oom", checkpoints="ckpt_oom")
    with pytest.raises(torch.OutOfMemoryError) as caught:
        stage.main(args)
    last = traceback.format_exception(caught.value)[-1].strip()
    assert last == ("torch.OutOfMemoryError: out of memory while training: lower train.per_device_batch_size (now 2; "
                    "raise train.gradient_accumulation_steps to keep the effective batch of 2) or "
                    "tokenize.max_length, or set train.gradient_checkpointing: true")
    assert "Tried to allocate 20.00 GiB" in str(caught.value.__cause__)  # the allocator's message, kept above it
    assert not Path(args.out).exists() and not Path(args.metrics).exists()


def test_changed_params_or_inputs_get_a_new_checkpoint_folder(workspace):
    import dataclasses

    from stages import train as stage
    from stages.lib.config import load_params
    from stages.lib.training import checkpoints

    loaded = load_params(make_args(workspace, "key").params, stage.PARAMS)
    params = {g: loaded[g] for g in stage.KEYED}  # model.prompt_format reaches the key through the data digest
    key = checkpoints.run_key(params, "d" * 64, "b" * 64)
    assert key == checkpoints.run_key(params, "d" * 64, "b" * 64)
    changed = {**params, "train": dataclasses.replace(params["train"], learning_rate=5e-3)}
    assert checkpoints.run_key(changed, "d" * 64, "b" * 64) != key
    assert checkpoints.run_key(params, "e" * 64, "b" * 64) != key
    assert checkpoints.run_key(params, "d" * 64, "c" * 64) != key
    digest = checkpoints.data_digest(workspace["tokenized"])
    assert digest == checkpoints.data_digest(workspace["tokenized"]) and len(digest) == 64


def test_data_digest_covers_the_splits_own_files_only(workspace, tmp_path):
    import json

    from stages.lib.training import checkpoints

    data = tmp_path / "tokenized"
    shutil.copytree(workspace["tokenized"], data)
    digest = checkpoints.data_digest(data)
    (data / "train" / "cache-0123456789abcdef.arrow").write_bytes(b"a map's cache")
    assert checkpoints.data_digest(data) == digest  # a stray cache file does not change the run key
    arrow = next((data / "validation").glob("data-*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"\0")
    assert checkpoints.data_digest(data) != digest  # the data itself does
    state = data / "train" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "_data_files": []}))
    with pytest.raises(ValueError, match="train/state.json: lists no data files"):
        checkpoints.data_digest(data)


def test_nf4_path_runs_end_to_end_on_cpu(workspace):
    from stages import train as stage

    args = make_args(workspace, "nf4", quant={"mode": "nf4"}, train={"max_steps": 2, "save_steps": 10})
    metrics = stage.main(args)
    assert metrics["precision"]["quant"] == "nf4"
    assert metrics["global_step"] == 2 and metrics["eval_loss"] is not None
    assert (Path(args.out) / "adapter_model.safetensors").is_file()
    info = json.loads((Path(args.out) / "training.json").read_text())
    assert info["precision"]["quant"] == "nf4"


@pytest.mark.parametrize("train,env,message", [
    ({"optimizer": "paged_adamw_8bit"}, {}, "needs CUDA|nothing to page"),
    ({"distributed": "fsdp", "num_processes": 2}, {}, "fsdp needs CUDA GPUs"),
    ({}, {"WORLD_SIZE": "2"}, "train.distributed is none"),
])
def test_impossible_setups_fail_before_loading(workspace, monkeypatch, train, env, message):
    from stages import train as stage
    from stages.lib.config import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        stage.main(make_args(workspace, "bad", train=train))


def test_missing_target_module_is_named(workspace):
    from stages import train as stage
    from stages.lib.config import ConfigError

    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] not found.*q_proj"):
        stage.main(make_args(workspace, "bad_target", lora={"target_modules": ["q_proj", "qkv_proj"]}))


def test_packing_refused_for_a_model_that_ignores_position_ids(workspace, monkeypatch):
    from stages import train as stage
    from stages.lib.config import ConfigError
    from stages.lib.training import setup

    monkeypatch.setattr(setup, "packing_supported", lambda model: False)
    with pytest.raises(ConfigError, match="packing needs a model"):
        stage.main(make_args(workspace, "bad_packing", train={"packing": True}))


def test_unknown_train_key_is_rejected(workspace):
    from stages import train as stage
    from stages.lib.config import ConfigError

    args = make_args(workspace, "typo")
    raw = yaml.safe_load(Path(args.params).read_text())
    raw["train"]["learning_rte"] = 1e-3
    Path(args.params).write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="unknown key.*learning_rte"):
        stage.main(args)


def test_the_prompt_format_travels_with_the_adapter(workspace, tmp_path):
    """Trained with model.prompt_format: plain, the adapter's marker says so (ask, evaluate, export read it)."""
    from helpers import run_tokenize
    from stages import train as stage
    from stages.lib.model.chat import check_recorded_format

    tokenized = run_tokenize(tmp_path, workspace["base"], prompt_format="plain").out
    args = make_args(workspace, "plain", train={"max_steps": 2, "save_steps": 10}, prompt_format="plain")
    args.tokenized = tokenized
    stage.main(args)
    assert json.loads((Path(args.out) / "base_model.json").read_text())["prompt_format"] == "plain"
    check_recorded_format(args.out, "plain")


def test_chatml_on_a_base_without_its_tokens_adds_and_trains_only_their_rows(tmp_path):
    """base_model adds <|im_start|>/<|im_end|> (resized embeddings, recorded in source.json); tokenize ends answers
    on the new <|im_end|>; train trains LoRA plus exactly those embedding rows, and reports what they cost."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import run_tokenize
    from stages import base_model, train as stage
    from stages.lib.serving.merge import merge_adapter
    from stages.lib.testing.models import write_tiny_plain_base

    raw = write_tiny_plain_base(tmp_path / "raw")
    model = {"source": str(raw), "prompt_format": "chatml"}
    (tmp_path / "base_params.yaml").write_text(yaml.safe_dump({"model": model}))
    base_model.main(Namespace(params=str(tmp_path / "base_params.yaml"), out=str(tmp_path / "base"),
                              report=str(tmp_path / "base_model.json")))
    base = tmp_path / "base"
    added = json.loads((base / "source.json").read_text())["added_tokens"]
    assert sorted(added) == ["<|im_end|>", "<|im_start|>"]
    (tmp_path / "tok").mkdir()
    tokenized = run_tokenize(tmp_path / "tok", base, prompt_format="chatml")
    labels = __import__("datasets").load_from_disk(str(Path(tokenized.out) / "train"))["labels"]
    ended = sum(row[-1] == added["<|im_end|>"] for row in labels)  # the cut answers end without it
    assert ended == json.loads(Path(tokenized.report).read_text())["splits"]["train"]["with_end_of_turn"] > 0

    ws = {"root": tmp_path, "base": base, "tokenized": Path(tokenized.out)}
    args = make_args(ws, "chatml", train={"max_steps": 2, "save_steps": 10}, prompt_format="chatml")
    metrics = stage.main(args)
    hidden = AutoModelForCausalLM.from_pretrained(base).config.hidden_size
    assert metrics["added_token_params"] == 2 * hidden
    assert json.loads((Path(args.out) / "adapter_config.json").read_text())["trainable_token_indices"]

    before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach().clone()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), args.out).merge_and_unload()
    after = tuned.get_input_embeddings().weight.detach()
    changed = {i for i in range(len(before)) if not torch.equal(before[i], after[i])}
    assert changed == set(added.values())  # the new rows learned; no other row of the embedding moved
    _, report, _ = merge_adapter(base, args.out, "float32", torch.tensor([[added["<|im_start|>"], 5, 6, 7]]))
    assert report.ok
