# The project's interface: `make demo` and `make test` each work alone on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages as command=package, each checked by its command (busybox-static and
# python3-venv by what they do: a dynamic busybox does not do, venv needs ensurepip).
# The program needs numactl (the agents run under it) and venv.
RUN_NEEDS := numactl=numactl python3-venv=python3-venv
# The suite needs: virt-xml-validate and xmllint (the layout plan's libvirt XML is validated);
# qemu-system-x86_64, a static /bin/busybox and cpio (the two-node NUMA guest); prometheus and
# promtool (the alert rules' tests, a real Prometheus scraping a daemon); systemd and its
# tools (the units under a real systemd, PID 1 of the QEMU guest: tests/systemd_vm); bindfs (a FUSE staging
# folder whose writers the daemon's inotify does not hear: tests/system/test_remote_writes.py).
TEST_NEEDS := $(RUN_NEEDS) virt-xml-validate=libvirt-clients xmllint=libxml2-utils \
	qemu-system-x86_64=qemu-system-x86 busybox-static=busybox-static cpio=cpio \
	prometheus=prometheus promtool=prometheus \
	systemd=systemd systemd-analyze=systemd systemd-sysusers=systemd systemd-tmpfiles=systemd \
	bindfs=bindfs

# $(call ensure-packages,NEEDS): install with apt-get (as root) the packages whose command is
# missing, only then, so a machine that has them all pays no apt run; without root or apt-get,
# name them and stop. Nothing in the suite skips for want of a package.
define ensure-packages
	@missing=""; \
	for need in $(1); do \
	  cmd=$${need%%=*}; pkg=$${need#*=}; \
	  case $$cmd in \
	    busybox-static) [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 ;; \
	    python3-venv) $(PY) -c 'import ensurepip, venv' >/dev/null 2>&1 ;; \
	    systemd) [ -x /lib/systemd/systemd ] || [ -x /usr/lib/systemd/systemd ] ;; \
	    *) command -v $$cmd >/dev/null 2>&1 ;; \
	  esac || case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg" ;; esac; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing with apt-get:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "missing Debian packages:$$missing" >&2; \
	  echo "install them first: sudo apt-get install --no-install-recommends$$missing" >&2; \
	  exit 1; \
	fi
endef

.PHONY: install demo test lint bench soak clean system-packages test-packages coverage

install: system-packages $(STAMP)

$(STAMP): pyproject.toml | system-packages
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# `make demo` needs what the program needs; `make test` everything the suite runs.
system-packages:
	$(call ensure-packages,$(RUN_NEEDS))

test-packages:
	$(call ensure-packages,$(TEST_NEEDS))

demo: install
	$(BIN)/coordinatorctl demo --lake iceberg $(if $(BATCHES),--batches $(BATCHES)) $(if $(ROWS),--rows $(ROWS))

test: test-packages install
	$(BIN)/pytest -q

# The suite under coverage with every Python process it starts ([tool.coverage.*] in
# pyproject.toml): combined line coverage of coordinator/ and agents/, failing under 93 %.
# Slower than `make test`, which stays as it is. Data and the HTML report go to build/coverage/.
COV_DIR := build/coverage
coverage: test-packages install
	rm -rf $(COV_DIR) && mkdir -p $(COV_DIR)
	@status=0; data=$(CURDIR)/$(COV_DIR)/.coverage; \
	COVERAGE_FILE=$$data $(BIN)/coverage run -m pytest -q $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/coverage combine -q --data-file=$$data $(COV_DIR) || exit $$?; \
	$(BIN)/coverage html -q --data-file=$$data -d $(COV_DIR)/html --fail-under=0; \
	$(BIN)/coverage report --data-file=$$data || { rc=$$?; [ $$status != 0 ] || status=$$rc; }; \
	if [ $$status != 0 ]; then echo "make coverage: exit $$status (suite or fail_under)" >&2; fi; \
	exit $$status

lint: install
	$(BIN)/ruff check coordinator agents tests
	$(BIN)/ruff format --check coordinator agents
	$(BIN)/mypy
	$(BIN)/lint-imports

# Every figure against its anchor in the same run (docs/benchmarks.md); a few minutes.
bench: install
	$(BIN)/coordinatorctl bench

# The soaks under chaos at a larger size: `make soak N=1000` (one host), `HOSTS_N=600` (the
# batches of the three-host soak, tests/soak/test_soak_hosts.py).
soak: install
	SOAK_BATCHES=$(or $(N),200) SOAK_HOSTS_BATCHES=$(or $(HOSTS_N),300) \
		$(BIN)/pytest -q -s --timeout=0 tests/soak

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
