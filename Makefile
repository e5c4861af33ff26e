# deetune: all set-up is here; every target is idempotent.
#   make run     install what the agent needs, build, and run it on this host (as root)
#   make test    install what the tests need (servers too), build, run the whole suite
#   make bench   run the benchmarks in bench/
#   make ui      fetch the web UI's JavaScript dependencies (npm) into src/deetune/api/static/vendor/

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLANG ?= clang
ARGS ?= --api 127.0.0.1:9477
PYTEST_ARGS ?=

# Debian packages: to build and run the agent, and to run the tests.
RUN_DEBS := clang llvm libbpf-dev libbpf1 bpftool make python3-venv python3-dev gcc nodejs npm
TEST_DEBS := nginx redis-server redis-tools mariadb-server mariadb-client prometheus wrk \
             iproute2 chromium procps curl openssl libssl-dev golang-go nghttp2-client \
             postgresql-15 dnsmasq-base rabbitmq-server memcached mosquitto beanstalkd

BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_HDR := $(wildcard bpf/*.h)
BPF_OUT := src/deetune/_bpf
BPF_ARCHES := x86 arm64
BPF_OBJS := $(foreach a,$(BPF_ARCHES),$(patsubst bpf/%.bpf.c,$(BPF_OUT)/$(a)/%.bpf.o,$(BPF_SRC)))
# -g keeps BTF (needed for CO-RE); llvm-strip -g then drops DWARF only.
BPF_CFLAGS := -g -O2 -Wall -Werror -target bpf -Ibpf

.PHONY: setup run test bench bpf deps test-deps venv clean examples ui ffi

setup: deps venv bpf ui

run: setup
	$(PY) -m deetune.agent $(ARGS)

test: setup test-deps examples
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup test-deps
	$(PY) bench/run_all.py

deps: .stamps/deps
# Re-checked when the Makefile changes (e.g. a package added to RUN_DEBS).
.stamps/deps: Makefile
	@mkdir -p .stamps
	@# A nodejs from elsewhere (e.g. NodeSource) bundles npm and conflicts with Debian's npm:
	@# a working node/npm command counts as installed.
	@missing=$$(for p in $(RUN_DEBS); do \
	  case $$p in nodejs) command -v node >/dev/null && continue;; npm) command -v npm >/dev/null && continue;; esac; \
	  dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
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
	@for s in nginx redis-server mariadb prometheus postgresql rabbitmq-server memcached mosquitto beanstalkd; do \
	  systemctl disable --now $$s >/dev/null 2>&1 || true; done
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The web UI's JavaScript (cytoscape for the graph, uPlot for the charts), pinned in
# ui/package-lock.json, fetched from npm at build time and served by the agent itself (no CDN
# at run time).
UI_VENDOR := src/deetune/api/static/vendor
ui: $(UI_VENDOR)/cytoscape.min.js $(UI_VENDOR)/uPlot.iife.min.js $(UI_VENDOR)/uPlot.min.css

ui/node_modules/.package-lock.json: ui/package.json ui/package-lock.json | .stamps/deps
	cd ui && npm ci --no-audit --no-fund
	@touch $@

$(UI_VENDOR)/cytoscape.min.js: ui/node_modules/.package-lock.json
	@mkdir -p $(@D)
	cp ui/node_modules/cytoscape/dist/cytoscape.min.js $@

$(UI_VENDOR)/uPlot.iife.min.js $(UI_VENDOR)/uPlot.min.css: ui/node_modules/.package-lock.json
	@mkdir -p $(@D)
	cp ui/node_modules/uplot/dist/$(@F) $@

bpf: $(BPF_OBJS) $(BPF_OUT)/deetune.h

# The cffi declarations (libbpf's API, deetune.h's layouts) parsed ahead of time into
# checked-in modules; run after changing bpf/deetune.h (tests/test_ffi_build.py tells).
ffi: $(VENV)/.installed
	$(PY) -m deetune._ffi_build

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

# The example third-party plugin (examples/deetune-signals): its BPF objects,
# built with the main flags (-Ibpf finds deetune's common.bpf.h, vmlinux.h and
# deetune.h) into its own package, then an editable install into the venv.
EX_DIR := examples/deetune-signals
EX_SRC := $(wildcard $(EX_DIR)/bpf/*.bpf.c)
EX_HDR := $(wildcard $(EX_DIR)/bpf/*.h)
EX_OUT := $(EX_DIR)/src/deetune_signals/_bpf
EX_OBJS := $(foreach a,$(BPF_ARCHES),$(patsubst $(EX_DIR)/bpf/%.bpf.c,$(EX_OUT)/$(a)/%.bpf.o,$(EX_SRC)))

examples: $(EX_OBJS) $(EX_OUT)/signals.h $(VENV)/.examples-installed

$(EX_OUT)/signals.h: $(EX_DIR)/bpf/signals.h
	@mkdir -p $(@D)
	cp $< $@

$(EX_OUT)/x86/%.bpf.o: $(EX_DIR)/bpf/%.bpf.c $(EX_HDR) $(BPF_HDR) | .stamps/deps
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -D__TARGET_ARCH_x86 -c $< -o $@
	llvm-strip -g $@

$(EX_OUT)/arm64/%.bpf.o: $(EX_DIR)/bpf/%.bpf.c $(EX_HDR) $(BPF_HDR) | .stamps/deps
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -D__TARGET_ARCH_arm64 -c $< -o $@
	llvm-strip -g $@

$(VENV)/.examples-installed: $(EX_DIR)/pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e $(EX_DIR)
	@touch $@

clean:
	rm -rf $(BPF_OUT)/x86 $(BPF_OUT)/arm64 $(BPF_OUT)/deetune.h .stamps $(EX_OUT) $(VENV)/.examples-installed \
	  ui/node_modules $(UI_VENDOR)
