# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
# torch==2.13.0 is in the same install command as everything else (pyproject pins it), so pip
# never resolves torch to a CUDA build on a CPU-only machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mechrl-installed

.PHONY: setup demo test test-slow test-all clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mechrl demo

test: $(STAMP)
	$(PY) -m pytest

# Long checks (minutes each), skipped by default.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
