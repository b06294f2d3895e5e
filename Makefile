# arks-ray: two commands set everything up.
#   make test   create/update .venv, install everything, lint, run the whole suite
#   make demo   create/update .venv, bring the local demo up and stream one chat completion
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: venv lint test unit demo demo-down crds clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (arks-ray needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	@# CPU torch first, so that nothing later pulls the multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[cpu,dev]"
	@# PyPI's torchvision/torchaudio/torchcodec break beside CPU torch ("torchvision::nms does not exist").
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

crds: venv
	$(VENV)/bin/arks-ray crds --write

demo: venv
	@echo "make demo: the local serving demo lands with the serving-spine issue (#3); not yet available."; exit 2

demo-down:
	@echo "make demo-down: nothing to stop yet."

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
