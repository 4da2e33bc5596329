"""Download the pinned wheels a GPU machine needs, for carrying to it (it has no package index).

Versions come from the environment that runs this script (run it with the project's venv, whose versions are
requirements.txt's): the named roots and their dependency closure, as Python 3.12 on x86-64 Linux sees it.
torch, triton and nvidia-* stay out: the GPU machine keeps its own CUDA build. Prints every wheel and the total
size, and fails past --limit-mib (for a transfer capped at 64 MiB a copy, the working tree included).

    .venv/bin/python tools/gpu_wheels.py --out .gpu/whl
    # on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .gpu/whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from stages.lib.versions import normalize_name as normalize

ROOTS = ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "tokenizers", "safetensors",
         "huggingface-hub", "gguf")
# dvc is not needed on the GPU machine (benchmarks/gpu_full.py runs the stages without it); dvclive is train's
# metrics logger. Their closure is large, so it travels only when asked for.
OPTIONAL_ROOTS = ("dvc", "dvclive")
# Large compiled libraries the GPU image has (at versions that datasets 5.2 accepts: check pyarrow >= 24 there);
# carrying them (80 MiB together) would not fit one call.
GPU_HAS = ("numpy", "pandas", "pyarrow")
NEVER = re.compile(r"^(torch|triton|nvidia-.*)$")
# Where the GPU runs Python: markers are evaluated for this, so only what 3.12 installs is carried.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# pip matches manylinux tags exactly, so each glibc level is named (bitsandbytes ships manylinux_2_24 only). Up to
# 2.35: a newer tag could pick a wheel the GPU image's glibc cannot load.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)) + ("manylinux2014_x86_64", "manylinux1_x86_64")


def closure(roots, skip: set[str]) -> dict[str, str]:
    """{name: installed version} for roots and everything they require (no extras) on TARGET."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [normalize(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in skip or NEVER.match(name):
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed on the GPU but not installed here; "
                             "install requirements.txt first") from None
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**TARGET, "extra": ""}):
                todo.append(normalize(req.name))
    return dict(sorted(found.items()))


def download(pins: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(out),
           *(f"{name}=={version}" for name, version in pins.items())]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("pip download failed (above); a package without a matching wheel needs its platform tag "
                         "in PLATFORMS")


def main(args: argparse.Namespace) -> int:
    roots = ROOTS + (OPTIONAL_ROOTS if args.with_dvc else ())
    skip = {normalize(s) for s in (*GPU_HAS, *args.skip)}
    pins = closure(roots, skip)
    if args.only:
        only = {normalize(n) for n in args.only}
        pins = {n: v for n, v in pins.items() if n in only}
    print(f"{len(pins)} packages: {', '.join(f'{n}=={v}' for n, v in pins.items())}")
    if skip:
        print(f"left out: {', '.join(sorted(skip))} (GPU_HAS: the image has them; --skip: given)")
    download(pins, args.out)
    wanted = {normalize(n) for n in pins}
    wheels = sorted(args.out.glob("*.whl"))
    stale = [w.name for w in wheels if normalize(w.name.split("-")[0]) not in wanted]
    if stale:
        raise SystemExit(f"{args.out} holds wheels not in this set: {', '.join(stale)}; empty it first "
                         "(two versions of one package stop the install)")
    total = 0
    for wheel in wheels:
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"total {total / 2**20:.2f} MiB in {len(wheels)} wheels ({args.out})")
    if total > args.limit_mib * 2**20:
        print(f"over --limit-mib {args.limit_mib}: leave out what the GPU image already has (--skip NAME), "
              "or carry the rest in a second call", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the wheels (e.g. .gpu/whl)")
    parser.add_argument("--skip", nargs="*", default=[], help="packages the GPU image already has at a "
                        "version that works (their own requirements are not followed either)")
    parser.add_argument("--only", nargs="*", default=[], help="of that set, just these (to carry it in parts: "
                        "--only NAME into one folder, --skip NAME into another)")
    parser.add_argument("--with-dvc", action="store_true", help="carry dvc and dvclive too")
    parser.add_argument("--limit-mib", type=float, default=56, help="fail past this total (for a transfer "
                        "capped at 64 MiB a copy, the working tree included)")
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
