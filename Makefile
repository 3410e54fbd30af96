# bitlm: `make run` trains the quickstart, `make test` runs every test.
# Both create .venv on first use and install core plus every plugin (editable).
# `make test-core` runs core's tests in .venv-core, which has no plugin installed: core alone
# must run end to end (tests that need a plugin skip, saying which). The multi-process jobs of
# tests/test_distributed.py use core alone and run once, in `make test`.
#
# TORCH picks the PyTorch build installed when .venv has none. The default is the CPU wheel of
# this project's machines; for a GPU build, install it into .venv first (or set TORCH), and pip
# keeps it, since bitlm-core only asks for torch>=2.2.

PYTHON ?= python3
VENV   ?= .venv
CORE_VENV ?= .venv-core
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
# what plugins' own tests need beyond the core's test extra: the dashboard's browser test drives
# Debian's chromium (`.ci/run` installs it) through Playwright
PLUGIN_TEST := playwright>=1.40
STAMP  := $(VENV)/.bitlm-installed
CORE_STAMP := $(CORE_VENV)/.bitlm-installed

.PHONY: run test test-core bench install assets clean

install: $(STAMP) assets

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" $(foreach p,$(PLUGINS),-e $(p)) "$(PLUGIN_TEST)"
	touch $(STAMP)

# The dashboard's charting library (uPlot) comes from the npm registry, checked against its
# published digest; without a network the rest still works, and the dashboard says what to run.
assets: $(STAMP)
	@$(BIN)/python -m bitlm_dashboard.assets || echo "warning: uPlot was not fetched; bitlm dashboard needs it: run $(BIN)/python -m bitlm_dashboard.assets"

run: $(STAMP) assets
	$(BIN)/bitlm run

test: $(STAMP) assets
	$(BIN)/python -m pytest

$(CORE_STAMP): pyproject.toml
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -c "import torch" 2>/dev/null || $(CORE_VENV)/bin/pip install -q "$(TORCH)"
	$(CORE_VENV)/bin/pip install -q -e ".[test]"
	touch $(CORE_STAMP)

test-core: $(CORE_STAMP)
	$(CORE_VENV)/bin/python -m pytest tests -m "not jobs"

bench: $(STAMP)
	$(BIN)/python benchmarks/attention.py --quick
	$(BIN)/python benchmarks/telemetry.py

clean:
	rm -rf $(VENV) $(CORE_VENV) runs .hypothesis
