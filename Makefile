# dwcp-agent: every target creates .venv if missing and installs what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
APT_STAMP := $(VENV)/.apt-stamp
NATIVE_SRC := $(wildcard native/*.pyx native/*.pxd)
# System tools the tests and benchmarks use: iperf3/zstd/lz4 as references, iproute2/iptables/
# ethtool/libnetfilter-queue for the WAN test bed, rdma-core/pyverbs for RDMA discovery,
# prometheus/alertmanager/promtool/amtool for the operator surface, etcd for the consensus bench,
# qemu-system-x86/busybox-static/cpio for the live-migration test guest, qemu-utils/rsync for the sparse bench,
# libipsec-mb-dev for AES-GCM on sealed data streams (native/stream.pyx).
APT_PKGS := iperf3 zstd lz4 iproute2 iptables ethtool gcc libnetfilter-queue-dev libxxhash-dev libipsec-mb-dev \
	        python3-pyverbs rdma-core ibverbs-utils prometheus prometheus-alertmanager systemd \
	        etcd-server etcd-client \
	        qemu-system-x86 qemu-utils rsync busybox-static cpio kmod
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all demo demo-live test test-fast bench bench-quick lint fuzz soak native clean apt venv

all: native

$(APT_STAMP): Makefile
	@mkdir -p $(VENV)
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	  || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y --no-install-recommends $$missing; }; \
	fi
	@touch $@

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(APT_STAMP)
	$(BIN)/pip install -q 'Cython>=3.0' 'setuptools>=68' wheel 'numpy>=1.26'
	$(BIN)/pip install -q --no-build-isolation -e '.[test,bench]'
	$(BIN)/python tools/link_pyverbs.py
	@touch $@

native: $(STAMP) $(NATIVE_SRC)
	$(BIN)/python setup.py -q build_ext --inplace
	@[ ! -f tools/nfq-delay/Makefile ] || $(MAKE) -s -C tools/nfq-delay

venv: native

demo: native
	$(BIN)/dwcp-agent demo

# A real QEMU guest (Debian kernel + busybox, built and cached on first use) moved live between two agents.
demo-live: native
	$(BIN)/dwcp-agent demo --live

test: native
	$(BIN)/python -m pytest -q -ra
	$(MAKE) lint
	$(MAKE) bench-quick

# CI runs the harness too (small inputs, no thresholds): the numbers land in its log and in
# benchmarks/results/; performance is judged from them, never by a timed assert.
bench-quick: native
	$(BIN)/python -m benchmarks.run_all --quick --only kernels datapath repeat_migration

test-fast: native
	$(BIN)/python -m pytest -q -ra -m "not slow and not system"

lint: $(STAMP)
	$(BIN)/ruff check dwcp_agent tests benchmarks tools
	$(BIN)/mypy dwcp_agent

bench: native
	$(BIN)/python -m benchmarks.run_all

fuzz: native
	DWCP_FUZZ_ITERATIONS=2000000 $(BIN)/python -m pytest -q tests -k fuzz

soak: native
	DWCP_SIM_SCHEDULES=50000 $(BIN)/python -m pytest -q tests -k simulation
	DWCP_NEMESIS_SECONDS=600 $(BIN)/python -m pytest -q -s --timeout=3600 tests/nemesis

clean:
	rm -rf build dwcp_agent/_native/*.so native/*.c
