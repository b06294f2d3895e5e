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

.PHONY: venv sysdeps lint test unit demo demo-down crds clean

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

# Dynamo (ai-dynamo 1.6.1) in its own virtualenv: it pins kubernetes<33 and pydantic<=2.13.5. Installed
# --no-deps plus its listed dependencies, less aisimulate (a stub that downloads from an unreachable index,
# needed only for Dynamo's AI-simulated perf models). Dynamo apps start `$(DYN_VENV)/bin/python -m dynamo.*`.
DYN_VENV := .venv-dynamo
DYN_PKGS := ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
DYN_DEPS := aiohttp==3.14.5 certifi==2026.10.19.post1 kubernetes==32.0.1 msgspec==0.23.0 prometheus-client==0.26.0 \
  pyzmq==27.3.0 redis==8.1.0 tqdm==4.70.1 transformers==5.24.0 typing-extensions==4.16.0 zstandard==0.25.0 \
  pydantic==2.13.5 uvloop==0.23.0
DYN_STAMP := $(DYN_VENV)/.installed-$(shell echo '$(DYN_PKGS) $(DYN_DEPS)' | sha256sum | cut -c1-16)

.PHONY: dynamo-venv
dynamo-venv: $(DYN_STAMP)

$(DYN_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Dynamo needs Python 3.11)"; exit 1; }
	@test -x $(DYN_VENV)/bin/python || $(PYTHON) -m venv $(DYN_VENV)
	$(DYN_VENV)/bin/python -m pip install -q --upgrade pip wheel
	$(DYN_VENV)/bin/python -m pip install -q --no-deps $(DYN_PKGS)
	$(DYN_VENV)/bin/python -m pip install -q --no-warn-conflicts $(DYN_DEPS)
	$(DYN_VENV)/bin/python -m dynamo.mocker --version
	@rm -f $(DYN_VENV)/.installed-*
	@touch $@

# moto's S3 server in its own virtualenv (botocore pins python-dateutil<3; kubernetes 37 needs >=3).
# The model-source tests start `$(S3_VENV)/bin/moto_server` on loopback as a real S3 API.
S3_VENV := .venv-s3
S3_PKGS := moto[server]==5.2.5
S3_STAMP := $(S3_VENV)/.installed-$(shell echo '$(S3_PKGS)' | sha256sum | cut -c1-16)

.PHONY: s3-venv
s3-venv: $(S3_STAMP)

$(S3_STAMP):
	@test -x $(S3_VENV)/bin/python || $(PYTHON) -m venv $(S3_VENV)
	$(S3_VENV)/bin/python -m pip install -q '$(S3_PKGS)'
	@rm -f $(S3_VENV)/.installed-*
	@touch $@

# System packages the tests need (root on these machines; sudo elsewhere).
sysdeps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@command -v promtool >/dev/null || { \
	  echo "installing prometheus and promtool (apt)"; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; }

lint: venv hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Dockerfiles are linted in `make test` (through lint); the images themselves are built only by `make images`
# (buildah as root, no daemon; minutes and GBs, so never part of the test run). docker/README.md.
.PHONY: hadolint images
hadolint: venv
	$(VENV)/bin/hadolint docker/*.Dockerfile

images:
	docker/build.sh $(IMAGES)

test: lint sysdeps dynamo-venv s3-venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

crds: venv
	$(VENV)/bin/arks-ray crds --write

DEMO_FILE ?= configs/examples/local-demo.yaml
DEMO_TOKEN ?= sk-arks-demo-local-only

demo: venv
	@# Brings the demo up (generating the tiny model on first use), streams one answer, leaves it running.
	time $(VENV)/bin/arks-ray up -f $(DEMO_FILE) --detach
	@echo "--- one streamed chat completion through the gateway, with the demo token:"
	time ARKS_TOKEN=$(DEMO_TOKEN) $(VENV)/bin/arks-ray chat -m tiny "Hello! Who are you?"
	@echo "--- still running: http://127.0.0.1:8000/v1 (token $(DEMO_TOKEN)); 'make demo-down' stops it."

demo-down: venv
	$(VENV)/bin/arks-ray down

clean:
	rm -rf $(VENV) $(DYN_VENV) .pytest_cache .mypy_cache .ruff_cache
