"""DVC stage scripts; run each as `python -m stages.<name>`."""

import importlib.util as _util
import sys as _sys

# dvc.yaml runs `python -m stages.<name>` with the first python on PATH. When that is not the project's environment
# (a shell without `source .venv/bin/activate`), say so in one line instead of a ModuleNotFoundError deep in a stage.
_missing = [name for name in ("yaml", "tqdm", "torch", "transformers") if _util.find_spec(name) is None]
if _missing:
    raise SystemExit(f"{_sys.executable} cannot import {', '.join(_missing)}: it is not the project's Python. "
                     "Run `make setup` once, then `source .venv/bin/activate` in this shell (or use `make repro`); "
                     "dvc runs every stage with the first `python` on PATH.")
