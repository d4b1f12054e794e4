# The two commands of the README. Both bootstrap .venv from nothing on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= examples/reuters-minilm/config.yaml

.PHONY: demo test lint

demo:
	@scripts/bootstrap.sh demo
	$(VENV)/bin/gkd distill $(CONFIG)

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -q

lint:
	@scripts/bootstrap.sh test
	$(VENV)/bin/ruff check .
