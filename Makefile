# Two commands: `make demo` (the embedded default) and `make test` (the test suite).
SHELL := /bin/bash
PY := .venv/bin/python

export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test bootstrap clean-venv

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m ddps demo

test: bootstrap
	@$(PY) -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

clean-venv:
	rm -rf .venv
