"""Installed library versions against the pins in requirements.txt, checked at stage start.

A stage names the libraries it uses; one warning line lists each whose installed version is not its pin (or that
is missing), and a version known to break with the stage's params is refused with a one-line error. torch is
held to a supported range instead of its pin: GPU machines bring their own CUDA build. Only importlib.metadata
is read, nothing is imported, so the check costs milliseconds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from stages.lib.io import library_versions

log = logging.getLogger(__name__)

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"

# The torch releases the stages have run on: 2.11 (the GPU image's 2.11.0+cu130) to 2.13 (the CPU pin).
# Widen it only after the tests and a GPU run pass on the new release.
TORCH_RANGE = ((2, 11), (2, 13))


@dataclass(frozen=True)
class KnownBreak:
    library: str
    works_from: str                      # first release that works
    applies: Callable[[Mapping], bool]   # on the stage's params (group -> dataclass, as load_params returns)
    setting: Callable[[Mapping], str]    # the params setting that needs the newer release, for the message
    why: str
    workaround: str


def _repetition_penalty(params: Mapping) -> float:
    return getattr(params.get("eval"), "repetition_penalty", 1.0)


KNOWN_BREAKS = (
    # generation.py hands RepetitionPenaltyLogitsProcessor a per-row tensor of padding widths; releases before
    # 5.23.0 accept only an int and raise "prompt_ignore_length has to be a positive integer" (read in the
    # 5.17.0 to 5.22.2 sources; 5.23.0 added the tensor branch).
    KnownBreak("transformers", "5.23.0", lambda p: _repetition_penalty(p) != 1.0,
               lambda p: f"eval.repetition_penalty {_repetition_penalty(p)}",
               "its RepetitionPenaltyLogitsProcessor rejects the per-row prompt_ignore_length that batched "
               "generation passes", "or set eval.repetition_penalty: 1.0"),
)


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} from the `name==version` lines; comments and blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no requirements file; the stages compare installed versions with it")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;=]+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        pins[normalize_name(match.group(1))] = match.group(2)
    return pins


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: 2.11.0+cu130 -> (2, 11, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def version_problems(pins: Mapping[str, str], installed: Mapping[str, str | None]) -> list[str]:
    """One entry per library that is missing, off its pin, or (torch) outside TORCH_RANGE."""
    problems = []
    for name, version in installed.items():
        pin = pins[name]
        if version is None:
            problems.append(f"{name} not installed (pinned {pin})")
        elif name == "torch":
            if not TORCH_RANGE[0] <= release(version)[:2] <= TORCH_RANGE[1]:
                low, high = (".".join(map(str, v)) for v in TORCH_RANGE)
                problems.append(f"torch {version} (supported {low} to {high}.x, pinned {pin})")
        elif version != pin:
            problems.append(f"{name} {version} (pinned {pin})")
    return problems


def known_break(pins: Mapping[str, str], installed: Mapping[str, str | None], params: Mapping) -> str | None:
    """The refusal message for the first known break that the installed versions and params hit, else None."""
    for brk in KNOWN_BREAKS:
        version = installed.get(brk.library)
        if version is None or release(version) >= release(brk.works_from) or not brk.applies(params):
            continue
        return (f"{brk.library} {version} breaks with {brk.setting(params)}: {brk.why} (fixed in "
                f"{brk.works_from}; requirements.txt pins {pins[brk.library]}). Fix: pip install "
                f"{brk.library}=={pins[brk.library]} (pip install -r requirements.txt), {brk.workaround}")
    return None


def check_versions(libraries: Sequence[str], params: Mapping | None = None,
                   requirements: Path = REQUIREMENTS) -> None:
    """Warn in one line about every library of `libraries` off its pin; refuse (SystemExit) a known break."""
    pins = read_pins(requirements)
    names = [normalize_name(n) for n in libraries]
    unpinned = [n for n in names if n not in pins]
    if unpinned:
        raise ValueError(f"{requirements} pins no {', '.join(unpinned)}; add the pin or drop it from the check")
    installed = library_versions(names)
    problems = version_problems(pins, installed)
    if problems:
        log.warning("installed versions differ from requirements.txt: %s; results may differ — "
                    "pip install -r requirements.txt", ", ".join(problems))
    refusal = known_break(pins, installed, params or {})
    if refusal:
        raise SystemExit(refusal)
