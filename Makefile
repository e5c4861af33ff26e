# deetune: all set-up is here; every target is idempotent.
#   make run     install what the agent needs, build, and run it on this host (as root)
#   make test    install what the tests need (servers too), build, run the whole suite
#   make bench   run the benchmarks in bench/

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
ARGS ?=
PYTEST_ARGS ?=

# Debian packages: to build and run the agent, and to run the tests.
RUN_DEBS := clang llvm libbpf-dev libbpf1 bpftool make python3-venv python3-dev gcc
TEST_DEBS := nginx redis-server redis-tools mariadb-server mariadb-client prometheus wrk \
             iproute2 chromium procps

BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_HDR := bpf/deetune.h bpf/vmlinux.h bpf/common.bpf.h
BPF_OUT := src/deetune/_bpf
BPF_ARCHES := x86 arm64
BPF_OBJS := $(foreach a,$(BPF_ARCHES),$(patsubst bpf/%.bpf.c,$(BPF_OUT)/$(a)/%.bpf.o,$(BPF_SRC)))
# -g keeps BTF (needed for CO-RE); llvm-strip -g then drops DWARF only.
BPF_CFLAGS := -g -O2 -Wall -Werror -target bpf -Ibpf

.PHONY: setup run test bench bpf deps test-deps venv clean

setup: deps venv bpf

run: setup
	$(PY) -m deetune.agent $(ARGS)

test: setup test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup test-deps
	$(PY) bench/run_all.py

deps: .stamps/deps
.stamps/deps:
	@mkdir -p .stamps
	@missing=$$(for p in $(RUN_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

test-deps: .stamps/test-deps
.stamps/test-deps: .stamps/deps
	@missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for tests: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# Debian starts these on install; tests run their own instances on other ports.
	@for s in nginx redis-server mariadb prometheus; do systemctl disable --now $$s >/dev/null 2>&1 || true; done
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

bpf: $(BPF_OBJS) $(BPF_OUT)/deetune.h

$(BPF_OUT)/deetune.h: bpf/deetune.h
	@mkdir -p $(BPF_OUT)
	cp $< $@

$(BPF_OUT)/x86/%.bpf.o: bpf/%.bpf.c $(BPF_HDR) | .stamps/deps
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -D__TARGET_ARCH_x86 -c $< -o $@
	llvm-strip -g $@

$(BPF_OUT)/arm64/%.bpf.o: bpf/%.bpf.c $(BPF_HDR) | .stamps/deps
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -D__TARGET_ARCH_arm64 -c $< -o $@
	llvm-strip -g $@

clean:
	rm -rf $(BPF_OUT)/x86 $(BPF_OUT)/arm64 $(BPF_OUT)/deetune.h .stamps
