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
	$(BIN)/surgeon plan examples/lora_qv.peft --model tiny:llama
	$(BIN)/surgeon apply examples/lora_qv.peft --model tiny:llama -o out/lora_qv --force
	@echo "PEFT checkpoint: out/lora_qv (adapter_config.json + adapter_model.safetensors)"
	@ls -l out/lora_qv

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out build *.egg-info
