# Quick start: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OMP ?= 1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$(OMP) $(PY) -m pytest -q tests

demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP) $(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info demo_output
