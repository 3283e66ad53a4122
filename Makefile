# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the package into it (editable, from settings.ini).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever the requirements change (settings.ini is the one place they live).
REQS := $(shell sha1sum settings.ini setup.py | sha1sum | cut -c1-12)
INSTALLED := $(VENV)/.installed-$(REQS)
DEV_INSTALLED := $(VENV)/.installed-dev-$(REQS)

.PHONY: demo test check-sync readme docs benchmark benchmark-instructions benchmark-peers clean-venv browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): | $(BIN)/python
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_INSTALLED): | $(BIN)/python
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (trainloop_nb)" >/dev/null
	touch $@ $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/trainloop-demo --epochs 15 --device cpu

# Every check; fails on the first that fails.
test: $(DEV_INSTALLED) browser-deps docs
	bash tools/check_sync.sh
	$(BIN)/python tools/readme.py --check
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/python -m pytest tests -q -rs  # -rs: every skip prints its reason

# The browser tests drive Debian's Chromium (Playwright cannot download its own browsers here).
browser-deps:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# The notebooks must be clean and the library exported from them.
check-sync: $(DEV_INSTALLED)
	bash tools/check_sync.sh

# README.md is generated from nbs/index.ipynb (Quarto, which nbdev_readme needs, is not available).
readme: $(DEV_INSTALLED)
	$(BIN)/python tools/readme.py

# Static HTML pages of every notebook, outputs and widgets included, in _docs/ (nbconvert; no Quarto).
# The widget renderer is vendored from the npm registry so the pages work offline.
docs: $(DEV_INSTALLED)
	@command -v npm >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q npm; }
	$(BIN)/python tools/render_docs.py

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/overhead.py

# The per-step comparison (or, with INSTRUCTIONS_ARGS=--peers, the peers' two targets) counted in instructions
# under valgrind's callgrind: figures a shared machine's load cannot blur.
INSTRUCTIONS_ARGS ?=
benchmark-instructions: $(INSTALLED)
	@command -v valgrind >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q valgrind; }
	$(BIN)/python benchmarks/instructions.py $(INSTRUCTIONS_ARGS)

# TrainingLoop against plain PyTorch loops, fastai's Learner and Lightning's Trainer on one job.
# The peers live in their own venv: they are never requirements of the project. Each is installed
# on its own, so one that pip cannot install is left out (the script says so) and the rest still run.
PEERS_VENV := .venv-peers
PEERS_INSTALLED := $(PEERS_VENV)/.installed-$(REQS)
PEERS_ARGS ?=

$(PEERS_INSTALLED):
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --upgrade --quiet pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -e .
	$(PEERS_VENV)/bin/python -m pip install --quiet fastai || echo "fastai could not be installed; benchmark-peers runs without it"
	$(PEERS_VENV)/bin/python -m pip install --quiet lightning || echo "lightning could not be installed; benchmark-peers runs without it"
	touch $@

benchmark-peers: $(PEERS_INSTALLED)
	$(PEERS_VENV)/bin/python benchmarks/peers.py $(PEERS_ARGS)

clean-venv:
	rm -rf $(VENV) $(PEERS_VENV)
