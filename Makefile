# Two commands do all the set-up on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Absolute, so it also holds in the copies DVC makes for queued/--temp experiments (.dvc/tmp/exps/...).
VENV_BIN := $(abspath $(VENV))/bin
PY := $(VENV_BIN)/python
DVC := $(VENV_BIN)/dvc
# dvc.yaml runs `python -m stages.<name>`: the first python on PATH must be the project's, so every target here
# puts the venv first (as `source .venv/bin/activate` does for your own shell).
export PATH := $(VENV_BIN):$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
# Where pip takes torch from. Empty = the package index (Linux: the multi-GB CUDA build unless your pip config says
# otherwise); CPU-only machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)
# npm packages for the offline `dvc plots show` template (below)
VEGA := vega

.PHONY: setup repro test lint check export ask demo sweep-plot readme clean-venv

# Create/refresh the virtual environment (re-installs only when requirements*.txt or pyproject.toml change) and the
# offline `dvc plots show` template.
# Without npm (a bare GPU machine, say) everything but the offline plots template is set up, with a warning.
setup: $(VENV)/.installed
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(VEGA)/dvc_plots.html; \
	else echo "warning: npm not found: skipped the offline dvc plots template (dvc plots show will load vega from a CDN; Debian: apt-get install npm, then make setup)" >&2; fi

# Last, the project itself: editable, without dependencies (requirements.txt pins them). dvc's `python -m stages.X`
# still imports the stages of the folder it runs in (the current directory comes first on sys.path), so a queued
# experiment's copy under .dvc/tmp/exps runs its own code, not this checkout's.
$(VENV)/.installed: requirements.txt requirements-ui.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) "$(TORCH_PIN)")
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ui.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# `dvc plots show` pages load vega, vega-lite and vega-embed from a CDN by default (blank plots offline). Here they
# come from the npm registry at set-up (versions pinned by vega/package-lock.json), are inlined into a template, and
# this checkout's DVC uses it (.dvc/config.local, not committed: the file is made per checkout).
$(VEGA)/node_modules/.package-lock.json: $(VEGA)/package.json $(VEGA)/package-lock.json
	npm ci --prefix $(VEGA) --omit=optional --no-audit --no-fund --ignore-scripts --loglevel=error
$(VEGA)/dvc_plots.html: $(VEGA)/node_modules/.package-lock.json tools/plots_template.py $(VENV)/.installed
	$(PY) -m tools.plots_template --modules $(VEGA)/node_modules --out $@
	$(DVC) config --local plots.html_template ../$@

# The whole pipeline on the embedded default (SmolLM2-135M-Instruct, CPU profile).
repro: setup
	$(DVC) repro

test: setup
	$(PY) -m pytest -q tests

# ruff's rules and exemptions are in pyproject.toml; CI (.ci/run) runs this before the tests.
lint: setup
	$(VENV_BIN)/ruff check .

# Params validation only (fast): every group parses, no unknown keys.
check: setup
	$(PY) -c "from stages.lib.config import validate_all; validate_all('params.yaml'); print('params.yaml OK')"

clean-venv:
	rm -rf $(VENV)

# Merged 16-bit model + tokenizer + model card + Ollama Modelfile in models/export (not part of `dvc repro`).
EXPORT_DTYPE ?= bfloat16
export: setup
	$(PY) -m tools.export --params params.yaml --base models/base --adapter models/adapter \
		--metrics reports/evaluation.json --out models/export --dtype $(EXPORT_DTYPE)

# make ask Q="What causes glaucoma?"   (no Q = interactive chat)
ask: setup
	$(PY) -m tools.ask --params params.yaml --base models/base --adapter models/adapter $(if $(Q),"$(Q)")

# The chat demo: the fine-tuned and the base model side by side, streamed, at http://127.0.0.1:$(DEMO_PORT) only.
DEMO_PORT ?= 7860
demo: setup
	$(PY) -m tools.demo --params params.yaml --base models/base --adapter models/adapter --port $(DEMO_PORT)

# README's results block, regenerated from the committed metrics files.
readme: setup
	$(PY) -m tools.update_readme

# Reference 001's "final loss vs learning rate per batch size" from the experiment list (not a stage: its input is
# the experiment list, which no stage can declare).
sweep-plot: setup
	$(DVC) exp show --json > reports/experiments.json
	$(PY) -m tools.sweep_plot --experiments reports/experiments.json --out reports/plots/sweep_loss_vs_lr.png
