"""The stage-start version check: one warning line for versions off requirements.txt, silence when all match,
torch's range, the known transformers break refused, and a broken requirements file named."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.lib import versions
from stages.lib.versions import check_versions, read_pins

PINS = """# comment
torch==2.13.0
transformers==5.24.0
peft==0.21.2  # trailing comment

huggingface-hub==2.4.0
"""
MATCHING = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "huggingface-hub": "2.4.0"}
LIBS = ("torch", "transformers", "peft", "huggingface_hub")


@pytest.fixture
def requirements(tmp_path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(PINS)
    return path


@pytest.fixture
def installed(monkeypatch):
    found = dict(MATCHING)
    monkeypatch.setattr(versions, "library_versions", lambda names: {n: found.get(n) for n in names})
    return found


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == versions.log.name and r.levelno == logging.WARNING]


def eval_params(penalty: float) -> dict:
    return {"eval": SimpleNamespace(repetition_penalty=penalty)}


def test_all_matching_is_silent(requirements, installed, caplog):
    check_versions(LIBS, eval_params(1.1), requirements)
    assert warnings(caplog) == []


def test_mismatches_in_one_line_with_installed_and_pinned(requirements, installed, caplog):
    installed.update(transformers="5.24.1", peft="0.21.0", **{"huggingface-hub": None})
    check_versions(LIBS, None, requirements)
    [line] = warnings(caplog)
    assert line.startswith("installed versions differ from requirements.txt: ")
    assert "transformers 5.24.1 (pinned 5.24.0)" in line
    assert "peft 0.21.0 (pinned 0.21.2)" in line
    assert "huggingface-hub not installed (pinned 2.4.0)" in line
    assert "torch" not in line
    assert line.endswith("pip install -r requirements.txt")


def test_only_the_stage_libraries_are_checked(requirements, installed, caplog):
    installed["peft"] = "0.20.0"
    check_versions(("torch", "transformers"), None, requirements)
    assert warnings(caplog) == []


@pytest.mark.parametrize("torch_version", ["2.11.0+cu130", "2.12.1", "2.13.0", "2.13.2+cpu"])
def test_torch_inside_its_range_is_silent(requirements, installed, caplog, torch_version):
    installed["torch"] = torch_version
    check_versions(LIBS, None, requirements)
    assert warnings(caplog) == []


@pytest.mark.parametrize("torch_version", ["2.10.0+cu128", "2.14.0", "3.0.0"])
def test_torch_outside_its_range_warns(requirements, installed, caplog, torch_version):
    installed["torch"] = torch_version
    check_versions(LIBS, None, requirements)
    [line] = warnings(caplog)
    assert f"torch {torch_version} (supported 2.11 to 2.13.x, pinned 2.13.0)" in line


@pytest.mark.parametrize("old", ["5.17.0", "5.22.2"])
def test_transformers_before_5_23_refused_with_a_repetition_penalty(requirements, installed, old):
    installed["transformers"] = old
    with pytest.raises(SystemExit) as err:
        check_versions(LIBS, eval_params(1.1), requirements)
    message = str(err.value)
    assert "\n" not in message
    assert f"transformers {old} breaks with eval.repetition_penalty 1.1" in message
    assert "prompt_ignore_length" in message
    assert "requirements.txt pins 5.24.0" in message
    assert "pip install transformers==5.24.0" in message


def test_old_transformers_allowed_without_a_repetition_penalty(requirements, installed, caplog):
    installed["transformers"] = "5.17.0"
    check_versions(LIBS, eval_params(1.0), requirements)
    check_versions(LIBS, None, requirements)  # stages without eval params
    assert warnings(caplog) == ["installed versions differ from requirements.txt: transformers 5.17.0 (pinned "
                                "5.24.0); results may differ — pip install -r requirements.txt"] * 2


def test_transformers_5_23_takes_the_per_row_tensor(requirements, installed):
    installed["transformers"] = "5.23.0"
    check_versions(LIBS, eval_params(1.1), requirements)


def test_unparsable_requirements_named(tmp_path, installed):
    path = tmp_path / "requirements.txt"
    path.write_text("torch==2.13.0\ntransformers>=5.24\n")
    with pytest.raises(ValueError, match=r"requirements\.txt:2: expected name==version, got 'transformers>=5.24'"):
        check_versions(LIBS, None, path)


def test_missing_requirements_named(tmp_path, installed):
    path = tmp_path / "nowhere" / "requirements.txt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        check_versions(LIBS, None, path)


def test_library_without_a_pin_is_an_error(requirements, installed):
    with pytest.raises(ValueError, match="pins no trl"):
        check_versions(("transformers", "trl"), None, requirements)


def test_every_stage_library_is_pinned_in_the_repo():
    pins = read_pins(versions.REQUIREMENTS)
    import importlib

    for module in ("tools.ask", "stages.base_model", "stages.compare", "stages.download", "stages.evaluate",
                   "tools.export", "stages.plot", "stages.prepare", "stages.split", "stages.tokenize", "stages.train"):
        libraries = importlib.import_module(module).LIBRARIES
        assert {versions.normalize_name(n) for n in libraries} <= set(pins), module


def test_evaluate_stage_refuses_before_loading_anything(tmp_path, monkeypatch):
    import yaml

    from stages import evaluate

    params = yaml.safe_load((versions.REQUIREMENTS.parent / "params.yaml").read_text())
    params["eval"]["repetition_penalty"] = 1.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    real = versions.library_versions

    def with_old_transformers(names):
        return {n: "5.17.0" if n == "transformers" else v for n, v in real(names).items()}

    monkeypatch.setattr(versions, "library_versions", with_old_transformers)
    args = evaluate.build_parser().parse_args(["--params", str(tmp_path / "params.yaml"), "--split", "no-split",
                                               "--base", "no-base", "--out", "o.jsonl", "--summary", "s.json"])
    with pytest.raises(SystemExit, match="transformers 5.17.0 breaks with eval.repetition_penalty 1.1"):
        evaluate.main(args)
