# The two commands of the README, plus helpers. Every target installs what it needs first.
VENV  ?= .venv
STAMP := $(VENV)/.edgeprune-installed

.PHONY: demo test lint format setup clean

demo: $(STAMP)
	$(VENV)/bin/edgeprune demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
