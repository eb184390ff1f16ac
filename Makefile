# diffkd — set-up, demo, tests and benchmarks. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned: these wheels install from local disk on our machines (see README "Install notes").
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: help install demo test test-slow test-all lint format bench bench-tasks bench-gpu bench-gpu-rehearse fashion-mnist notebooks clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	set -o pipefail; $(PY) -m pip install --quiet -e ".[dev,detection,mmdet-ref]" $(TORCH_PINS) 2>&1 | tee $(VENV)/install.log
	@if grep -qE "BuildBackendWarning|SetuptoolsDeprecationWarning|DeprecationWarning" $(VENV)/install.log; then \
	  echo "error: the build backend warned of a deprecation during the install (see $(VENV)/install.log):" \
	       "pyproject.toml uses a form that will stop building; update it" >&2; exit 1; fi
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if needed) and install diffkd with its dev tools

fashion-mnist: ## install Debian's dataset-fashion-mnist when we are root and apt exists (else torchvision downloads it)
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ] \
	   && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
	  || echo "note: apt could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST instead"; \
	fi

demo: install fashion-mnist ## install, then run the main job on the embedded default (Fashion-MNIST, offline)
	$(PY) -m diffkd.train

test: install ## run the default (fast) test suite
	$(PY) -m pytest -m "not slow" -q

test-slow: install ## run only the slow tests (DDP spawn, longer runs)
	$(PY) -m pytest -m slow -q

test-all: install ## run every test
	$(PY) -m pytest -q

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install ## ruff autofix and format
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# a clone of the official code (README "Speed"): hunto/DiffKD at 5367f44 has its files at the root; its head has them
# in the classification submodule's lib/models/losses/diffkd (clone with --recurse-submodules). Either is used.
OFFICIAL_DIR ?= .official/DiffKD
OFFICIAL_CODE = $(wildcard $(OFFICIAL_DIR)/diffkd.py $(OFFICIAL_DIR)/classification/lib/models/losses/diffkd/diffkd.py)
comma := ,
BENCH_OFFICIAL = $(if $(OFFICIAL_CODE),--methods none$(comma)kd$(comma)diffkd$(comma)official_kd$(comma)official_diffkd --official-dir $(OFFICIAL_DIR))

bench: install ## CPU benchmark of a training step (student / KD / DiffKD [/ the official code, if cloned]; fp32 / bf16)
	@[ -n "$(OFFICIAL_CODE)" ] || [ ! -d "$(OFFICIAL_DIR)" ] || echo "note: $(OFFICIAL_DIR) holds no official code (a \
	clone of hunto/DiffKD's head without its submodule?), so no official rows; see README, Speed" >&2
	$(PY) -m diffkd.bench --compile off,teacher $(BENCH_OFFICIAL)

bench-tasks: install ## CPU benchmark of DiffKD on Cityscapes logits and on the FPN (heads' FLOPs; student / KD|FitNet / DiffKD steps)
	$(PY) -m diffkd.bench_tasks  # on a CPU shared with other jobs: OMP_WAIT_POLICY=PASSIVE make bench-tasks

bench-gpu: install ## GPU benchmark + 1-GPU DDP smoke + timed CIFAR-shaped run
	bash scripts/bench_gpu.sh

bench-gpu-rehearse: install ## every part of bench-gpu at toy size on the CPU (checks the commands, no timings)
	REHEARSE=cpu bash scripts/bench_gpu.sh

notebooks: install fashion-mnist ## execute notebooks/*.ipynb into notebooks/executed/ (git-ignored) with their outputs
	@$(PY) -c "import nbclient, nbformat, ipykernel, matplotlib, pandas" 2>/dev/null || \
	  $(PY) -m pip install --quiet -e ".[dev,detection,notebooks]" $(TORCH_PINS)
	$(PY) notebooks/execute.py --out notebooks/executed

clean: ## remove caches and run outputs (keeps .venv and data/)
	rm -rf .pytest_cache .ruff_cache logs outputs multirun
