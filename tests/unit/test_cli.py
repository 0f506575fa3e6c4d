"""The command-line tools: one console script per module of megatron_dchag/cli/, each answers ``--help``.

``tools/<name>.py`` and the root ``pretrain_*.py`` are thin wrappers around the same ``main``
functions. Nothing under tools/ or tests/ edits ``sys.path`` or loads a file by path: the package is
installed editable, and pytest's ``pythonpath = .`` makes ``tests.*`` importable.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.limits import SHORT_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]
CLI_DIR = REPO / "megatron_dchag" / "cli"
# Modules of megatron_dchag/cli/ that are not commands.
HELPER_MODULES = {"__init__", "checkout"}
# Commands with a root wrapper script instead of tools/<name>.py.
ROOT_SCRIPTS = {"pretrain_hyperspectral", "pretrain_era5", "finetune_hyperspectral"}
# Tools that still hold their own logic (and add the checkout to sys.path by hand): none any more.
# A tool added that way would have to be listed here until it gets its module in megatron_dchag/cli/.
NOT_YET_MOVED: set = set()

SYS_PATH_EDIT = re.compile(
    r"sys\.path\s*(?:\.\s*(?:insert|append|extend|remove|pop|clear)\s*\(|\[[^\]]*\]\s*=|\+?=(?!=))"
    r"|site\.addsitedir\s*\("
)
# (A bracketed letter keeps this file from matching its own pattern.)
LOAD_BY_PATH = re.compile(r"spec_from_file_locatio[n]|SourceFileLoade[r]|runpy\.run_path")


def _commands():
    return sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem not in HELPER_MODULES)


def _script_name(command: str) -> str:
    return "dchag-" + command.replace("_", "-")


def test_every_cli_module_has_a_console_script_and_a_thin_wrapper():
    dist = importlib.metadata.distribution("megatron_dchag")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    expected = {_script_name(c): f"megatron_dchag.cli.{c}:main" for c in _commands()}
    assert installed == expected, (
        "the installed console scripts differ from the modules of megatron_dchag/cli/: list one per module in "
        "setup.py and reinstall (pip install --no-deps -e .)"
    )
    for command in _commands():
        wrapper = REPO / (f"{command}.py" if command in ROOT_SCRIPTS else f"tools/{command}.py")
        text = wrapper.read_text()
        assert f"from megatron_dchag.cli.{command} import main\n" in text, wrapper
        assert 'if __name__ == "__main__":' in text, wrapper
        assert len(text.splitlines()) < 25, f"{wrapper} should be a thin wrapper around megatron_dchag.cli.{command}"


@pytest.mark.parametrize("command", _commands())
def test_console_script_help(command, tmp_path):
    name = _script_name(command)
    script = Path(sysconfig.get_path("scripts")) / name
    if not script.exists():
        script = Path(sys.executable).parent / name
    assert script.exists(), f"{name} is not installed: reinstall the package (pip install --no-deps -e .)"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"usage: {name}"), res.stdout[:500]


def test_no_sys_path_edits_or_loading_by_path_in_tools_and_tests():
    editing, loading = set(), set()
    for path in sorted([*REPO.glob("tools/**/*.py"), *REPO.glob("tests/**/*.py")]):
        text = path.read_text()
        rel = path.relative_to(REPO).as_posix()
        if SYS_PATH_EDIT.search(text):
            editing.add(rel)
        if LOAD_BY_PATH.search(text):
            loading.add(rel)
    assert editing - NOT_YET_MOVED == set(), "import the package instead of editing sys.path"
    assert NOT_YET_MOVED - editing == set(), "no longer edits sys.path: remove it from NOT_YET_MOVED in this file"
    assert loading == set(), "import tools as modules (from megatron_dchag.cli import ...) instead of loading files"
