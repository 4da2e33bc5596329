"""What several test files share: tokenized fixtures, train-stage arguments and probes, a tiny LoRA adapter.

Test files import from here (and the random models from stages.lib.testing.models), never from each other;
shared fixtures are in conftest.py.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import yaml

from stages.lib.serving.merge import BASE_MARKER
from stages.lib.model.source import sha256_file

ROOT = Path(__file__).resolve().parents[1]  # the checkout
FIXTURES = ROOT / "tests" / "fixtures"

# ---------------------------------------------------------------- tokenize stage inputs

QTYPES = ("symptoms", "causes", "treatment", "information")
SYSTEM_PROMPT = "You are a careful medical information assistant."


def make_records(n: int, start: int = 0, long_every: int = 5) -> list[dict]:
    """MedQuAD-shaped rows; every `long_every`-th answer is long enough to be truncated."""
    rows = []
    for i in range(start, start + n):
        qtype = QTYPES[i % len(QTYPES)]
        focus = f"disease {i}"
        answer = f"The {qtype} of {focus} are well described. Eat healthy food and exercise."
        if long_every and i % long_every == 0:
            answer += " It is inherited in an autosomal dominant pattern." * 12
        rows.append({"id": f"q{i:04d}", "question": f"What are the {qtype} of {focus}?", "answer": answer,
                     "qtype": qtype, "source": "GARD", "focus": focus})
    return rows


def write_split(folder: Path, n_train: int = 24, n_val: int = 8, n_test: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in make_records(n, start):
                fh.write(json.dumps(row) + "\n")
        start += n
    return folder


def write_params(path: Path, **groups) -> Path:
    """A params.yaml with the groups given (each a dict of overrides on small test defaults)."""
    defaults = {
        "tokenize": {"system_prompt": SYSTEM_PROMPT, "max_length": 128, "max_train_samples": None,
                     "max_eval_samples": None, "seed": 1},
    }
    raw = {name: {**defaults.get(name, {}), **values} for name, values in groups.items()}
    for name, values in defaults.items():
        raw.setdefault(name, values)
    path.write_text(yaml.safe_dump(raw))
    return path


def run_tokenize(tmp_path: Path, base: Path, **tokenize) -> Namespace:
    from stages import tokenize as stage

    args = Namespace(params=str(write_params(tmp_path / "params.yaml", tokenize=tokenize)),
                     split=str(write_split(tmp_path / "split")), base=str(base),
                     out=str(tmp_path / "tokenized"), report=str(tmp_path / "tokenize.json"))
    stage.main(args)
    return args


# ---------------------------------------------------------------- train stage arguments and probes

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear", "use_rslora": False, "use_dora": False}
TRAIN = {"learning_rate": 1e-2, "max_steps": 4, "per_device_batch_size": 2, "eval_steps": 2, "logging_steps": 1,
         "save_steps": 2, "report_to": "none", "warmup_ratio": 0.0, "seed": 7}


def make_args(ws, name: str, lora=None, quant=None, train=None, checkpoints: str = "ckpt") -> Namespace:
    run = ws["root"] / name
    run.mkdir(exist_ok=True)
    params = {"lora": {**LORA, **(lora or {})}, "quant": {"mode": "auto", **(quant or {})},
              "train": {**TRAIN, **(train or {})}}
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    return Namespace(params=str(run / "params.yaml"), tokenized=str(ws["tokenized"]), base=str(ws["base"]),
                     checkpoints=str(ws["root"] / checkpoints), live=str(run / "live"), out=str(run / "adapter"),
                     metrics=str(run / "headline.json"), run_report=str(run / "metrics.json"),
                     launch_configs=str(ROOT / "configs" / "accelerate"))


class Probe:
    """A TrainerCallback that keeps the first training batch and weight snapshots before/after training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Probe(TrainerCallback):
            batch = before = after = None

            def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
                self.batch = next(iter(train_dataloader))
                self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kw):
                self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

        return _Probe()


def assert_only_lora_changed(probe) -> None:
    import torch

    lora = [n for n in probe.before if "lora_" in n]
    base = [n for n in probe.before if "lora_" not in n]
    assert lora and base
    assert all(torch.equal(probe.before[n], probe.after[n]) for n in base), "base weights changed"
    assert any(not torch.equal(probe.before[n], probe.after[n]) for n in lora), "LoRA weights did not change"


def save_cut_short(real_save, suffix: str, then):
    """A torch.save that, for the file whose path ends with `suffix`, writes the first half of its bytes and then
    calls `then()` (a kill, a full-disk error): a save interrupted mid-file. Other files are saved normally."""
    import io

    def save(obj, f, *args, **kwargs):
        if not str(f).endswith(suffix):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            fh.flush()
        then()

    return save


def adapter_tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# ---------------------------------------------------------------- a LoRA adapter on the tiny base

def write_tiny_adapter(base_dir: Path, out: Path, seed: int = 1, B_STD: float = 0.1) -> Path:
    """A LoRA adapter on the tiny base with random (nonzero) B, so merging changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # before get_peft_model: it draws lora_A from the global generator
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=B_STD)
    model.save_pretrained(out)
    (out / BASE_MARKER).write_text(json.dumps({"weights_sha256": sha256_file(base_dir / "model.safetensors")}))
    return out
