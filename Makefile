# Two entry points from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,quant,minilm]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/surgeon check examples/*.peft

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out build *.egg-info
