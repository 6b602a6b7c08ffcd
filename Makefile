# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
# torch==2.13.0 is in the same install command as everything else (pyproject pins it), so pip
# never resolves torch to a CUDA build on a CPU-only machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mechrl-installed

.PHONY: setup demo test test-slow test-gpu test-all bench-gpu clean chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mechrl demo

test: $(STAMP) chromium
	$(PY) -m pytest

# The report's browser test needs Debian's Chromium; install it when missing (as root, or with sudo).
# Never fails `make test`: without apt the browser test skips and says why.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium: no apt-get here; the browser test will skip"; \
	else SUDO=""; [ "$$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"; }; \
	  { $$SUDO apt-get install -y --no-install-recommends chromium \
	    || { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; } \
	  || echo "chromium: apt-get install failed; the browser test will skip"; fi

# Long checks (minutes each), skipped by default.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Checks that need a CUDA device (skipped by default); refused at once on a machine without one.
test-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no CUDA device on this machine')"
	$(PY) -m pytest -m gpu

# The GPU measurement set (tests marked gpu, then bench/rollout_vs_generate.py and bench/grpo_vs_trl.py at
# both shapes, fp32 and bf16): JSONs in bench/results/, about 10 minutes on an H100/H200.
bench-gpu: $(STAMP)
	PY=$(PY) bash bench/gpu.sh

# Everything: the default suite and the slow checks; the GPU checks too, which skip (saying why) without CUDA.
test-all: $(STAMP) chromium
	$(PY) -m pytest -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
