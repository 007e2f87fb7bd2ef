# Two entry points from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup clean system-deps

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

# Debian packages the viz tests use (Graphviz's `dot`, headless chromium), installed only when
# missing and only as root; elsewhere a note, and those tests skip with the reason.
VIZ_DEBS := graphviz chromium
system-deps:
	@if command -v dot >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VIZ_DEBS) >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VIZ_DEBS) >/dev/null 2>&1; } || \
	  echo "note: could not install $(VIZ_DEBS); the viz tests that need them will skip"; \
	else echo "note: install $(VIZ_DEBS) (apt-get) to run every viz test"; fi

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out build *.egg-info
