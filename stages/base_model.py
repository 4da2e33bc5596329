"""Stage base_model: resolve model.source into models/base (safetensors, tokenizer, chat template, source.json).

    python -m stages.base_model --params params.yaml --out models/base --report reports/base_model.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from stages.lib.model import source
from stages.lib.model.chat import check_prompt_format
from stages.lib.config import load_params
from stages.lib.io import atomic_dir, run_metadata, setup_logging, write_json
from stages.lib.versions import check_versions

PARAMS = ("model",)
LIBRARIES = ("torch", "transformers", "tokenizers", "huggingface-hub", "gguf", "safetensors")

log = logging.getLogger("stages.base_model")


def main(args, run=None, download=None) -> dict:
    """`run`/`download` replace `subprocess.run` / `snapshot_download` in tests (no registry or hub here)."""
    start = time.perf_counter()
    setup_logging()
    check_versions(LIBRARIES)
    model_params = load_params(args.params, PARAMS)["model"]
    spec = source.check_source(model_params)  # every check that needs no download, first
    with tempfile.TemporaryDirectory(prefix="base_model-") as work:
        fetched = source.fetch_source(model_params, spec, Path(work), **({"run": run} if run else {}),
                                        download=download,
                                        before_weights=lambda folder: source.check_before_weights(model_params, folder))
        info = dict(fetched.provenance)
        if fetched.gguf_file:
            types = source.gguf_tensor_types(fetched.folder / fetched.gguf_file)
            source.check_gguf(fetched.folder / fetched.gguf_file, types)
            info["gguf_tensor_types"] = types
            quantized = [t for t in types if t not in ("F32", "F16", "BF16")]
            info["note"] = (f"weights dequantized to float32 from GGUF ({', '.join(quantized) or 'unquantized'}); "
                            "quality is that of the quantized file, not of the original release")
        model, tokenizer = source.load_plain_model(fetched, model_params.trust_remote_code)
        added = source.add_format_tokens(model, tokenizer, model_params.prompt_format)  # before the pad choice
        pad = source.set_pad_token(model, tokenizer)
        # plain and chatml need no chat template; chat does, and chatml needs its two tokens in the vocab
        check_prompt_format(tokenizer, model_params.prompt_format, model_params.source)
        with atomic_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            checksum, files = source.weights_checksum(tmp)
            info.update(
                # GGUF files carry a display name (general.name); other sources are named by the source itself
                name=getattr(model.config, "_model_name_or_path", None) or model_params.source,
                architecture=type(model).__name__,
                num_parameters=sum(p.numel() for p in model.parameters()),
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                weights_files=files, weights_sha256=checksum,
                eos_token=tokenizer.eos_token, pad_token=pad,
                trust_remote_code=model_params.trust_remote_code,
            )
            if added:  # only then, so a base that needed none keeps the bytes it had before prompt_format
                info["added_tokens"] = added
            # source.json is part of a cached output: only what follows from the inputs (no commit, machine or
            # time), so the same weights keep the same DVC hash and nothing downstream reruns
            write_json(tmp / "source.json", info)
            (tmp / "README.md").write_text(source.render_model_card(info), encoding="utf-8")
    write_json(args.report, {"weights_sha256": checksum, "seconds": round(time.perf_counter() - start, 1),
                             **run_metadata()})
    log.info("wrote %s: %s, %.1fM params, weights sha256 %s", args.out, info["architecture"],
             info["num_parameters"] / 1e6, checksum)
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="HF folder to write (models/base)")
    parser.add_argument("--report", required=True,
                        help="JSON with the run's provenance: git commit, platform, library versions, seconds")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
