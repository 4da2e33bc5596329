"""Which base an adapter belongs to, and folding a LoRA adapter into a 16-bit copy of that base.

The merge always starts from the base reloaded unquantized in float32: adding the LoRA update to
4-bit weights (a known PEFT pitfall) would re-quantize it away, and adding it in 16-bit rounds it
twice. The float32 result is cast to 16-bit once, and both steps are checked against base + adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stages.lib.io import read_json
from stages.lib.model.chat import BASE_MARKER
from stages.lib.model.source import weights_checksum

log = logging.getLogger(__name__)

SIXTEEN_BIT = ("bfloat16", "float16")


class BaseMismatchError(ValueError):
    """An adapter (or merged model) does not record, or does not match, the base it is used with."""


class MergeCheckError(ValueError):
    """The merged weights do not reproduce base + adapter (or do not fit the target dtype)."""


def base_weights_sha256(base_dir: str | Path) -> str:
    """sha256 of the base weights: the value base_model recorded in source.json, else hashed here."""
    base_dir = Path(base_dir)
    source = base_dir / "source.json"
    if source.is_file():
        recorded = read_json(source).get("weights_sha256")
        if recorded:
            return recorded
    if not any(base_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors weights in {base_dir} (run `dvc repro base_model` first)")
    log.info("%s records no weights_sha256; hashing the weights", source)
    return weights_checksum(base_dir)[0]  # the digest base_model records, so the two always agree


def check_same_base(base_dir: str | Path, model_dir: str | Path, what: str = "adapter") -> str:
    """Raise BaseMismatchError unless `model_dir`/base_model.json names the weights in `base_dir`.

    `base_model_name_or_path` in adapter_config.json is always the path models/base, so it cannot
    tell two bases apart; the checksum can.
    """
    base_dir, model_dir = Path(base_dir), Path(model_dir)
    marker = model_dir / BASE_MARKER
    expected = read_json(marker).get("weights_sha256") if marker.is_file() else None
    if not expected:
        raise BaseMismatchError(
            f"the {what} in {model_dir} carries no base checksum ({marker} with key weights_sha256 is missing), "
            f"so it cannot be checked against {base_dir}; re-run `dvc repro train` to record it")
    actual = base_weights_sha256(base_dir)
    if actual != expected:
        raise BaseMismatchError(
            f"the {what} in {model_dir} was trained on a different base model: it records weights_sha256 "
            f"{expected[:16]}..., but {base_dir} has {actual[:16]}...; re-run `dvc repro train` for this base "
            f"or point --base at the model it was trained on")
    return actual


@dataclass(frozen=True)
class LogitCheck:
    """How far one model's logits are from the reference (base + adapter, float32) on probe tokens."""
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float   # fraction of positions whose most likely next token is the same
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {"name": self.name, "max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff,
                "top1_agreement": self.top1_agreement, "tolerance": self.tolerance, "ok": self.ok}


def compare_logits(name: str, reference, candidate, atol: float, rtol: float) -> LogitCheck:
    """Max/mean |difference|, with a tolerance that scales with the size of the reference logits."""
    diff = (candidate.float() - reference.float()).abs()
    top1 = (candidate.argmax(-1) == reference.argmax(-1)).float().mean()
    tolerance = atol + rtol * reference.abs().max().item()
    return LogitCheck(name, diff.max().item(), diff.mean().item(), top1.item(), tolerance)


@dataclass(frozen=True)
class Tolerances:
    # float32 merge: only summation order differs from base + adapter.
    merge_atol: float = 1e-4
    merge_rtol: float = 1e-4
    # 16-bit copy: bf16 keeps ~3 significant digits per weight; errors add up through the layers.
    cast_atol: float = 0.05
    cast_rtol: float = 0.05


@dataclass(frozen=True)
class MergeReport:
    dtype: str
    adapter_effect: float        # max |logit change| the adapter makes on the probe (0 = the adapter does nothing)
    checks: tuple[LogitCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "adapter_effect_max_abs": self.adapter_effect, "ok": self.ok,
                "checks": [c.as_dict() for c in self.checks]}


def load_unquantized_base(base_dir: str | Path):
    """models/base in float32 on the CPU, whatever quant.mode says: the merge must never see 4-bit weights."""
    from stages.lib.model.loading import load_base_model
    from stages.lib.model.precision import Precision

    precision = Precision("cpu", "float32", "none", "merge: unquantized float32 so the LoRA update is not rounded away")
    return load_base_model(base_dir, precision)


def probe_logits(model, probe_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=probe_ids).logits.float()


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, dtype: str, probe_ids,
                  tolerances: Tolerances = Tolerances()):
    """(merged model in `dtype`, MergeReport, reference logits of base + adapter on `probe_ids`).
    Raises MergeCheckError if a logit check fails; the reference lets a caller check the saved files too.

    `probe_ids` is a [batch, seq] LongTensor of real prompts; `dtype` is bfloat16 or float16 for an
    export (float32 is accepted so tests and `ask --merged` can compare against an exact merge).
    """
    import torch
    from peft import PeftModel

    if dtype not in SIXTEEN_BIT + ("float32",):
        raise ValueError(f"merge dtype must be one of {SIXTEEN_BIT + ('float32',)}, got {dtype!r}")
    model = PeftModel.from_pretrained(load_unquantized_base(base_dir), str(adapter_dir))
    model.eval()
    reference = probe_logits(model, probe_ids)
    with model.disable_adapter():
        base = probe_logits(model, probe_ids)
    effect = (reference - base).abs().max().item()
    if effect == 0.0:
        log.warning("the adapter in %s changes no logit on the probe (untrained LoRA B = 0?)", adapter_dir)

    merged = model.merge_and_unload()
    checks = [compare_logits("float32 merge vs base+adapter", reference, probe_logits(merged, probe_ids),
                             tolerances.merge_atol, tolerances.merge_rtol)]
    if dtype != "float32":
        # Round the weights to 16-bit and run them in float32: this isolates the storage rounding
        # (what every runtime loading the file gets) and avoids CPU bf16 kernels, which are slow.
        target = getattr(torch, dtype)
        merged.to(target)
        bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise MergeCheckError(f"{len(bad)} merged tensor(s) overflow {dtype} (e.g. {bad[0]}); export in bfloat16")
        merged.to(torch.float32)
        checks.append(compare_logits(f"{dtype} weights vs base+adapter", reference, probe_logits(merged, probe_ids),
                                     tolerances.cast_atol, tolerances.cast_rtol))
        merged.to(target)  # lossless: the float32 values came from `target`
    report = MergeReport(dtype, effect, tuple(checks))
    for check in checks:
        log.info("logit check %s: max |diff| %.3g (tolerance %.3g), mean %.3g, top-1 agreement %.3f",
                 check.name, check.max_abs_diff, check.tolerance, check.mean_abs_diff, check.top1_agreement)
    if effect > 0 and len(checks) > 1 and checks[-1].max_abs_diff > 0.5 * effect:
        log.warning("rounding to %s moves the logits by %.3g, comparable to the adapter's own effect (%.3g): "
                    "the 16-bit copy keeps only part of the fine-tuning", dtype, checks[-1].max_abs_diff, effect)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise MergeCheckError("merged logits do not match base + adapter: " + "; ".join(
            f"{c.name}: max |diff| {c.max_abs_diff:.3g} > tolerance {c.tolerance:.3g}" for c in failed))
    return merged, report, reference
