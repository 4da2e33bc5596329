# Issue 15 part 5 on a GPU machine, from the checkout root holding .gpu/repo (this branch) and the wheels.
#   bash .gpu/repo/benchmarks/gpu_versions_proof.sh stash   # .gpu/whl1 (bitsandbytes); the image's own libraries
#   bash .gpu/repo/benchmarks/gpu_versions_proof.sh pinned  # .gpu/whl (the rest) on the same warm machine
set -o pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
W=/tmp/proof
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
show() { python3 -c 'import torch, transformers, peft, accelerate, tokenizers, huggingface_hub as h, safetensors
print("torch", torch.__version__, torch.cuda.get_device_name(), "| transformers", transformers.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__, "| tokenizers", tokenizers.__version__, "| huggingface_hub", h.__version__, "| safetensors", safetensors.__version__)
for m in ("trl", "datasets", "bitsandbytes"):
    try: print(m, __import__(m).__version__)
    except Exception as e: print(m, "import failed:", type(e).__name__, e)'; }
evaluate() { python3 -m stages.evaluate --params $W/params.yaml --split $W/split --base $W/base --out $W/out.jsonl --summary $W/summary.json; echo "evaluate exit code $?"; }
case "$1" in
stash)
  install .gpu/whl1/*.whl || exit 1
  cd .gpu/repo
  echo "== the GPU image's own libraries (no PYTHONPATH)"; show
  python3 -m pip list 2>/dev/null | grep -iE '^(numpy|pandas|pyarrow|hf-xet|fsspec|regex|pyyaml|tqdm|packaging|psutil|xxhash) '
  python3 -m benchmarks.gpu_versions_proof setup --work $W
  echo "== generate_answers with repetition_penalty 1.1, no version check (the old crash)"
  python3 -m benchmarks.gpu_versions_proof raw --work $W 2>&1 | tail -1
  echo "== the evaluate stage, same params"; evaluate 2>&1 | tail -3 ;;
pinned)
  install .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  cd .gpu/repo
  echo "== pinned wheels (PYTHONPATH=/tmp/site)"; show
  echo "== version check of the GPU stages (silent = no WARNING line)"; python3 -m benchmarks.gpu_versions_proof check
  python3 -m benchmarks.gpu_versions_proof setup --work $W
  echo "== generate_answers with repetition_penalty 1.1"; python3 -m benchmarks.gpu_versions_proof raw --work $W 2>&1 | tail -1
  echo "== the evaluate stage, repetition_penalty 1.1, batch 8, CUDA"; evaluate 2>&1
  python3 -c "import json; s = json.load(open('$W/summary.json')); print({k: s[k] for k in ('n_questions', 'mean_new_tokens', 'precision')})"
  echo "== tests"; python3 -m pytest -q -p no:cacheprovider tests/test_generation.py tests/test_versions.py 2>&1 | tail -5 ;;
esac
