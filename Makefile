# The project's interface: `make demo` and `make test` each work alone on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := numactl libvirt-clients libxml2-utils qemu-system-x86 busybox-static cpio

.PHONY: install demo test lint bench soak clean system-packages

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# numactl is required (agents run under it). The others serve optional tests (libvirt's schema
# check, the two-node QEMU test); missing ones make those tests skip with the reason.
system-packages:
	@if ! command -v numactl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing numactl with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq numactl; \
	  else \
	    echo "numactl is missing: install it (Debian/Ubuntu: sudo apt-get install numactl)" >&2; \
	    exit 1; \
	  fi; \
	fi

demo: install
	$(BIN)/coordinatorctl demo $(if $(BATCHES),--batches $(BATCHES)) $(if $(ROWS),--rows $(ROWS))

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check coordinator agents tests
	$(BIN)/ruff format --check coordinator agents
	$(BIN)/mypy

# Every figure against its anchor in the same run (docs/benchmarks.md); a few minutes.
bench: install
	$(BIN)/coordinatorctl bench

# The soak under chaos at a larger size: `make soak N=1000`.
soak: install
	SOAK_BATCHES=$(or $(N),200) $(BIN)/pytest -q -s --timeout=0 tests/soak

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
