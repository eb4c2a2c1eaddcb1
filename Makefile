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

# pytest exits 5 when it collects no tests; that is not a failure of the suite
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
