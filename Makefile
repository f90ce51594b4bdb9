# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates the virtual environment on first use (CPU torch from requirements-cpu.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.perl-installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow test-all benchmarks clean-notebooks

setup: $(STAMP)

# note: DeepSpeed (the `deepspeed` extra) ships only as source and its setup.py imports torch;
# built without build isolation it uses the pinned CPU torch installed first, instead of pulling
# an unpinned multi-GB CUDA torch into an isolated build environment.
$(STAMP): pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-cpu.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation -c requirements-cpu.txt 'deepspeed>=0.19,<0.20'
	$(BIN)/python -m pip install --quiet -c requirements-cpu.txt -e '.[dev,deepspeed]'
	touch $(STAMP)

# A short tracked GRPO run (LoRA, both trackers) on the embedded countdown-nano model.
demo: $(STAMP)
	$(BIN)/python run.py --enable_tracking --tracking_frequency 10 \
		--config.training.output_dir $(DEMO_DIR) --overwrite_output_dir

test: $(STAMP)
	$(BIN)/python -m pytest

# Slow tests (rebuilding the embedded model, ...), excluded from `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

benchmarks: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
