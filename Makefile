# Two commands do everything on a fresh machine: `make run` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV   ?= .venv
# On this project's CI/CPU machines torch==2.13.0 is the CPU build on local disk; on a GPU machine pass
# TORCH=torch (any CUDA build works).
TORCH  ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup run test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(PY) launch/train.py $(ARGS)

# The suite runs on TEST_WORKERS pytest-xdist workers (CI's machine has 2 cores), whole files per worker (a file's
# tests share its launches); TEST_WORKERS=0 runs it in this process.  pytest exits 5 when it collects no tests;
# that is not a failure of the suite
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; \
	exit $$rc
