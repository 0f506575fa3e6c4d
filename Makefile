# Quick start: `make demo` (the main job) and `make test` (the whole suite, both tested stacks).
#
# Tested stacks (one constraints file each, under constraints/):
#   primary  Python 3.11, torch 2.13.0 (CPU wheel), megatron-core 0.16.1   -> .venv
#   second   Python 3.12, torch 2.13.0,             megatron-core 0.19.2   -> .venv-py312
# `make test` lints, runs the whole suite on the primary stack, the stack-sensitive part of it on the
# second stack, and checks that installing the package into an environment that already holds another
# torch (2.14.1) keeps that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OMP ?= 1

# Python 3.12 for the second stack: the first of python3.12 on PATH and pyenv's 3.12.x that runs
# (a pyenv shim for a version that is not selected fails, so each candidate is tried).
PYTHON312 ?= $(shell for p in python3.12 "$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)"/versions/3.12*/bin/python; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v "$$p"; break; }; done)
VENV312 ?= .venv-py312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.installed-stamp

# The install check: a fresh environment that already holds torch 2.14.1 keeps it.
VENV_INSTALL_CHECK ?= .venv-install-check
INSTALL_CHECK_TORCH ?= 2.14.1
STAMP_INSTALL_CHECK := $(VENV_INSTALL_CHECK)/.installed-stamp

# pytest-xdist workers: one per core, at most 8 (most tests are one single-threaded process; a test
# file stays on one worker, so its shared runs are made once). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n : 8 )))
PYTEST := -m pytest -q -n $(TEST_WORKERS) --dist loadfile
# The package byte-compiled once for the interpreter about to run a suite: where PYTHONDONTWRITEBYTECODE
# is set (as in many CI images) each of the suite's several hundred processes would compile it again.
COMPILE := -m compileall -q -j 0 megatron_dchag tests

# What the second stack runs: what talks to megatron-core or whose float results depend on the torch
# build (the compatibility layer, the layers' numerics, TP/PP/VPP/DP/SP equivalence, the distributed
# optimizer, FSDP, checkpoint save/load/reshard, the convert tool's reshard and export/import, bf16
# and recompute), one end-to-end run of each entry point and the feature extractor. Left to the primary
# stack: what only Python and the project's own code decide (configs, bad input, signals, plots).
SECOND_STACK_TESTS ?= tests/unit/test_cpu_compat.py tests/unit/test_vit_spec.py tests/unit/test_checkpoint_save.py \
	tests/unit/test_channel_layers.py tests/unit/test_fused_channel_stage.py tests/unit/test_fast_paths.py \
	tests/distributed/test_tp_equivalence.py tests/distributed/test_scaleout.py tests/distributed/test_fsdp.py \
	tests/integration/test_convert_checkpoint.py::test_reshard_tp2_tp1_tp4_is_exact \
	tests/integration/test_convert_checkpoint.py::test_reshard_pp1_pp2_pp1_is_exact \
	tests/integration/test_convert_checkpoint.py::test_export_import_round_trip \
	tests/integration/test_pretrain_hyperspectral.py::test_resume_is_exact \
	tests/integration/test_pretrain_hyperspectral.py::test_recompute_and_bf16_options \
	tests/integration/test_pretrain_era5.py::test_train_tp2_then_evaluate_at_tp1 \
	tests/integration/test_finetune_hyperspectral.py::test_finetune_from_pretrained_tp2_matches_tp1_and_resumes_exactly \
	tests/integration/test_inference.py::test_extract_features_is_the_same_at_tp1_and_tp2_and_never_overwrites
# The smoke subset of the install check.
INSTALL_CHECK_TESTS ?= tests/unit/test_vit_spec.py tests/unit/test_channel_layers.py \
	tests/distributed/test_tp_equivalence.py

.PHONY: install install-second-stack install-check-env install-other-stacks test lint test-primary test-second-stack \
	check-install demo gpu-check constraints clean

install: $(STAMP)

# torch first and pinned to the local CPU wheel: an unpinned torch would pull several GB of CUDA wheels.
$(STAMP): setup.py constraints/py311-mcore016.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/py311-mcore016.txt torch
	$(PY) -m pip install -q -c constraints/py311-mcore016.txt -e ".[test]"
	touch $(STAMP)

install-second-stack: $(STAMP312)

$(STAMP312): setup.py constraints/py312-mcore019.txt
	@test -x "$(PYTHON312)" || { echo "error: Python 3.12 not found (set PYTHON312=/path/to/python3.12)" >&2; exit 2; }
	test -x $(PY312) || "$(PYTHON312)" -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip
	$(PY312) -m pip install -q -c constraints/py312-mcore019.txt torch
	$(PY312) -m pip install -q -c constraints/py312-mcore019.txt -e ".[test]"
	touch $(STAMP312)

# The suites are CPU-bound and the other environments' installs mostly downloads and unpacking: those
# installs run while the primary suite does (one after the other: both write the checkout's egg-info).
test: lint
	$(MAKE) --no-print-directory -j2 test-primary install-other-stacks
	$(MAKE) --no-print-directory test-second-stack check-install

install-other-stacks:
	$(MAKE) --no-print-directory install-second-stack
	$(MAKE) --no-print-directory install-check-env

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-primary: $(STAMP)
	@echo "== primary stack: $$($(PY) -c 'import sys, torch, megatron.core as m; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")' 2>/dev/null)"
	$(PY) $(COMPILE)
	OMP_NUM_THREADS=$(OMP) $(PY) $(PYTEST) tests

test-second-stack: $(STAMP312)
	@echo "== second stack: $$($(PY312) -c 'import sys, torch, megatron.core as m; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")' 2>/dev/null)"
	$(PY312) $(COMPILE)
	OMP_NUM_THREADS=$(OMP) $(PY312) $(PYTEST) $(SECOND_STACK_TESTS)

install-check-env: $(STAMP_INSTALL_CHECK)

$(STAMP_INSTALL_CHECK): setup.py
	rm -rf $(VENV_INSTALL_CHECK)
	$(PYTHON) -m venv $(VENV_INSTALL_CHECK)
	$(VENV_INSTALL_CHECK)/bin/pip install -q torch==$(INSTALL_CHECK_TORCH)
	$(VENV_INSTALL_CHECK)/bin/pip install -q -e ".[test]"
	touch $(STAMP_INSTALL_CHECK)

check-install: $(STAMP) $(STAMP_INSTALL_CHECK)
	$(VENV_INSTALL_CHECK)/bin/python -c "import torch; v = torch.__version__; assert v.startswith('$(INSTALL_CHECK_TORCH)'), f'torch was replaced: {v}'; print('install check: torch is still', v)"
	$(VENV_INSTALL_CHECK)/bin/python $(COMPILE)
	OMP_NUM_THREADS=$(OMP) $(VENV_INSTALL_CHECK)/bin/python $(PYTEST) $(INSTALL_CHECK_TESTS)
	rm -rf $(VENV_INSTALL_CHECK)
	# the editable install of the check pointed the checkout at that venv's build: restore the primary one
	$(PY) -m pip install -q --no-deps -e .

demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP) $(PY) tools/demo.py

# On a machine with GPUs: the GPU check kit (report in docs/gpu.md, raw JSON in docs/bench/).
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py

# Re-freeze the tested stacks after changing a requirement (then review the diff).
constraints: $(STAMP) $(STAMP312)
	$(PY) -m pip freeze --exclude-editable | grep -v -i '^megatron.dchag' > constraints/py311-mcore016.txt.new
	$(PY312) -m pip freeze --exclude-editable | grep -v -i '^megatron.dchag' > constraints/py312-mcore019.txt.new
	@echo "wrote constraints/*.txt.new: add the header comments and replace the old files"

clean:
	rm -rf $(VENV) $(VENV312) $(VENV_INSTALL_CHECK) build *.egg-info demo_output
