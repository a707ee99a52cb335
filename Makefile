# Set-up and entry points. Every target creates .venv/ in the repo root if it is missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.florist-hf-installed
# Three xdist workers on two cores: the Flower deployment tests spend most of their time waiting.
PYTEST_ARGS ?= -n 3

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo quality clean

install: $(STAMP)

# torch first, from the pinned CPU wheel, so no resolver ever pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,flower]"
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/florist-hf run recipes/tiny_cpu_demo.yaml

clean:
	rm -rf $(VENV) runs
