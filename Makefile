# Two commands: `make demo` (the embedded default) and `make test` (the test suite).
SHELL := /bin/bash
PY := .venv/bin/python

export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: reliability demo test test-fast bootstrap clean-venv

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m ddps demo

# --durations: the 15 slowest tests at the end
test: bootstrap
	@$(PY) -m pytest -q --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# the suite without the tests marked slow (Ray Train, full pipelines)
test-fast: bootstrap
	@$(PY) -m pytest -q -m "not slow"

# the tests marked reliability (faults, bad inputs, security); rewrites README's "Reliability" section
reliability: bootstrap
	$(PY) scripts/reliability.py

clean-venv:
	rm -rf .venv
