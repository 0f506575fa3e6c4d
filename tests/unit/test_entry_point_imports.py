"""The entry points answer ``--help`` and config errors before importing torch or megatron-core,
and name their workloads without importing them."""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO
from tests.limits import SHORT_TIMEOUT_S

ENTRY_MODULES = ("megatron_dchag.cli.pretrain_hyperspectral", "megatron_dchag.cli.pretrain_era5",
                 "megatron_dchag.cli.finetune_hyperspectral")

_PROBE = """
import contextlib, io, json, sys
from {module} import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    try:
        status = main({argv!r})
    except SystemExit as exc:
        status = exc.code
heavy = sorted(m for m in ("torch", "megatron.core", "numpy") if m in sys.modules)
print(json.dumps(dict(status=status, stderr=err.getvalue(), heavy=heavy)))
"""


def _probe(module, argv):
    res = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, argv=list(argv))], cwd=REPO,
                         capture_output=True, text=True, timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_help_and_a_config_error_do_not_import_torch(module):
    config = "configs/hyperspectral/tiny.yaml" if module.endswith("hyperspectral") else "configs/era5/tiny.yaml"
    shown = _probe(module, ["--help"])
    assert shown["status"] == 0 and shown["heavy"] == [], shown
    refused = _probe(module, ["--config", config, "training.log_interval=0"])
    assert refused["status"] == 2 and refused["heavy"] == [], refused
    assert refused["stderr"].strip() == "error: training.log_interval=0 must be a positive integer"


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_task_reference_names_the_task_and_its_config_sections(module):
    import importlib

    ref = importlib.import_module(module).TASK
    task_class = ref.load()
    assert task_class.__name__ == ref.attribute and tuple(task_class.config_sections) == ref.config_sections
