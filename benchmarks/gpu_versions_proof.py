"""Issue 15 part 5 proof on a GPU: the evaluate stage with repetition_penalty 1.1, batched, on a tiny Llama.

    python3 -m benchmarks.gpu_versions_proof setup --work /tmp/proof   # tiny base, split, params (rp 1.1)
    python3 -m benchmarks.gpu_versions_proof raw --work /tmp/proof     # generate_answers directly, no check
    python3 -m benchmarks.gpu_versions_proof check                     # the version check of the GPU stages
Run from the repo root; `raw` shows what an unchecked run does with the installed transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QTYPES = ["symptoms", "causes", "treatment", "inheritance"]


def setup(work: Path) -> None:
    from stages.lib.testing.models import write_tiny_base

    write_tiny_base(work / "base")
    # Questions of different lengths, so a batch holds left-padded rows (the case the per-row tensor serves).
    rows = [{"id": f"t{i}", "qtype": QTYPES[i % 4], "source": "GHR", "focus": f"disease {i}",
             "question": f"What are the {QTYPES[i % 4]} of disease {i}?" + " Please explain." * (i % 5),
             "answer": f"Disease {i} is a condition. It affects about {i + 1} in 10,000 people."} for i in range(16)]
    (work / "split").mkdir(parents=True, exist_ok=True)
    (work / "split" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"].update(max_samples=None, max_new_tokens=16, batch_size=8, repetition_penalty=1.1)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def raw(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.model.chat import end_of_turn_ids, render_prompt_ids
    from stages.lib.evaluation.generation import Decoding, generate_answers

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base").to("cuda")
    questions = [json.loads(line)["question"] for line in (work / "split" / "test.jsonl").read_text().splitlines()]
    prompts = [render_prompt_ids(tokenizer, "", q) for q in questions]
    out = generate_answers(model, tokenizer, prompts, Decoding(max_new_tokens=16, repetition_penalty=1.1), 8,
                           end_of_turn_ids(tokenizer), progress=False)
    print(f"raw generate_answers on {torch.cuda.get_device_name()}: {len(out)} answers, "
          f"{sum(len(g.token_ids) for g in out)} tokens")


def check() -> None:
    import importlib

    from stages.lib import versions

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for stage in ("stages.base_model", "stages.tokenize", "stages.train", "stages.evaluate", "tools.export"):
        libraries = importlib.import_module(stage).LIBRARIES
        print(f"{stage}: checking {', '.join(libraries)}", flush=True)
        versions.check_versions(libraries)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("setup", "raw", "check"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/proof"))
    a = parser.parse_args()
    setup(a.work) if a.step == "setup" else raw(a.work) if a.step == "raw" else check()
