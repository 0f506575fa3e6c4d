"""The commands in README.md and docs/*.md run as written.

Every shell block of the documents is read, continuation lines joined, and each command line of
ours is found: ``python tools/<x>.py``, ``python pretrain_*.py`` (and any root script of a
``megatron_dchag/cli`` command), the same under ``torchrun``, ``srun``, ``sbatch <launch script>``
and ``launch/local.sh``, the ``dchag-*`` console scripts, and ``make <target>``. A ``...`` or a
shell variable standing for arguments (``"${ARGS[@]}"``, ``data.channels=$CH``) is left out. For
each one:

- the script, launch script or make target exists;
- its arguments parse with the command's own parser (every flag exists, every value has its type);
- every ``--config`` file exists and loads with the command's dotted overrides (every field exists
  and is valid) at the world size the launcher gives (``--nproc-per-node``, ``srun -n``, ``-n``).

``test_cheap_commands_run`` then runs the data-preparation and memory-model commands of the
documents for real, in a scratch directory, with the synthetic cubes shrunk to a few pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# "${ARGS[@]}", "data.channels=$CH": arguments or values the line does not show (a shell variable's)
ARRAY_EXPANSION = re.compile(r"^(\$\{\w+\[[@*]\]\}|[\w.]+=\$\{?\w+\}?)$")
CLI = REPO / "megatron_dchag" / "cli"
OPTIONAL_FLAG = re.compile(r"\[(--[^\[\]]*)\]")  # "[--flag value]" in a synopsis: the flag as given
# torchrun / srun / sbatch / local.sh options that take a value (the rest are switches).
LAUNCHER_VALUE_OPTIONS = {
    "torchrun": {"--nproc-per-node", "--nproc_per_node", "--nnodes", "--master-port", "--master_port",
                 "--master-addr", "--master_addr", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--node-rank"},
    "srun": {"-n", "-c", "-N", "--ntasks", "--cpus-per-task", "--nodes", "-t", "--time"},
    "sbatch": {"-A", "-N", "-t", "-n", "-p", "--gpus-per-node", "--account", "--nodes", "--time", "--partition"},
    "launch/local.sh": {"-n"},
}


@dataclass
class DocCommand:
    """One command line of ours in a document."""

    where: str  # file:line of its block
    line: str  # as written, continuation lines joined
    kind: str  # "make", or the cli module name (e.g. "compute_stats", "pretrain_hyperspectral")
    script: Optional[str]  # the file the line runs (tools/x.py, pretrain_x.py, launch/...), if any
    argv: List[str]
    world_size: Optional[int]  # what the launcher starts; None: not known from the line
    block: int  # index of the shell block in its document
    elided: bool = False  # the line leaves arguments out ("...")


def _shell_blocks(path: Path):
    """(first line number, text) of each shell block of ``path``."""
    lines = path.read_text().splitlines()
    start, lang, body = None, None, []
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and start is None:
            start, lang, body = number, fence.group(1), []
        elif re.match(r"^\s*```\s*$", line) and start is not None:
            if lang in SHELL_FENCES:
                yield start, "\n".join(body)
            start = None
        elif start is not None:
            body.append(line)


def _launcher_options(tokens: List[str], launcher: str):
    """Split ``tokens`` after a launcher into (its options, the rest)."""
    takes_value, i, options = LAUNCHER_VALUE_OPTIONS[launcher], 0, {}
    while i < len(tokens) and tokens[i].startswith("-"):
        name, _, value = tokens[i].partition("=")
        if name in takes_value and not value:
            value, i = tokens[i + 1], i + 1
        options[name] = value
        i += 1
    return options, tokens[i:]


def _as_int(value) -> Optional[int]:
    return int(value) if value is not None and str(value).isdigit() else None


def _ours(tokens: List[str]):
    """(kind, script, argv, world size) when ``tokens`` run one of our commands, else None."""
    world: Optional[int] = 1
    if tokens[0] == "make":
        return "make", None, tokens[1:], None
    if tokens[0] in ("torchrun", "srun", "sbatch", "launch/local.sh"):
        options, rest = _launcher_options(tokens[1:], tokens[0])
        if tokens[0] == "torchrun":
            nnodes = options.get("--nnodes", "1")
            world = _as_int(options.get("--nproc-per-node", options.get("--nproc_per_node", "1")))
            world = world * int(nnodes) if world and nnodes.isdigit() else None
        elif tokens[0] == "srun":
            world = _as_int(options.get("-n", options.get("--ntasks")))
        elif tokens[0] == "launch/local.sh":
            world = _as_int(options.get("-n"))
        else:  # sbatch: the launch script starts one rank per device of the allocation
            if not rest or not rest[0].startswith("launch/"):
                return None
            world, rest = None, rest[1:]
        if not rest:
            return None
        if rest[0] in ("python", "python3"):
            rest = rest[1:]
        tokens = ["python", *rest] if rest[0].endswith(".py") else rest
        found = _ours(tokens)
        return None if found is None else (found[0], found[1], found[2], world)
    if tokens[0].startswith("dchag-"):
        return tokens[0][len("dchag-"):].replace("-", "_"), None, tokens[1:], world
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        script = tokens[1]
        root_command = re.fullmatch(r"\w+\.py", script) and (CLI / script).is_file()
        if script.startswith("tools/") or root_command or re.fullmatch(r"pretrain_\w+\.py", script):
            return Path(script).stem, script, tokens[2:], world
    return None


def doc_commands() -> List[DocCommand]:
    found = []
    for path in DOCUMENTS:
        for block, (start, text) in enumerate(_shell_blocks(path)):
            text = re.sub(r"\\\n\s*", " ", text)
            for line in text.splitlines():
                line = OPTIONAL_FLAG.sub(r"\1", line.strip())
                if not line or line.startswith("#"):
                    continue
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue
                while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                    tokens = tokens[1:]
                elided = any(t == "..." or ARRAY_EXPANSION.match(t) for t in tokens)
                tokens = [t for t in tokens if t != "..." and not ARRAY_EXPANSION.match(t)]
                ours = tokens and _ours(tokens)
                if ours:
                    kind, script, argv, world = ours
                    found.append(DocCommand(f"{path.relative_to(REPO)}:{start}", line, kind, script, argv, world,
                                            block, elided))
    return found


COMMANDS = doc_commands()


class _Captured(BaseException):
    """Raised by the patched parse methods to hand back the command's parser and arguments."""

    def __init__(self, parser, argv):
        super().__init__()
        self.parser, self.argv = parser, argv


def command_parser(kind: str, argv=("--help",)):
    """``(parser, arguments)``: the parser ``megatron_dchag.cli.<kind>.main(argv)`` builds and the
    arguments it hands it (a command may rewrite its own flags first), from its first parse call."""
    module = importlib.import_module(f"megatron_dchag.cli.{kind}")

    def capture(self, args=None, namespace=None):
        raise _Captured(self, list(args) if args is not None else None)

    names = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")
    saved = {name: getattr(argparse.ArgumentParser, name) for name in names}
    try:
        for name in names:
            setattr(argparse.ArgumentParser, name, capture)
        module.main(list(argv))
    except _Captured as got:
        return got.parser, got.argv
    finally:
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    raise AssertionError(f"megatron_dchag.cli.{kind}.main parsed no arguments")


def _parse(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """Parse as the command does; a parse error becomes one AssertionError line."""
    from megatron_dchag.config import ConfigError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_intermixed_args(argv)
    except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None
    except ConfigError as exc:
        raise AssertionError(str(exc)) from None


def _makefile_targets() -> set:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (REPO / "Makefile").read_text(), re.M))


def test_the_documents_have_commands():
    kinds = {c.kind for c in COMMANDS}
    assert len(COMMANDS) >= 30 and {"pretrain_hyperspectral", "pretrain_era5", "convert_checkpoint", "make"} <= kinds


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.kind}" for c in COMMANDS])
def test_documented_command_matches_the_parsers(command: DocCommand):
    from megatron_dchag.config import ConfigError, load_config
    from megatron_dchag.training.arguments import flag_overrides

    context = f"{command.where}: {command.line}"
    if command.kind == "make":
        missing = [t for t in command.argv if not t.startswith("-") and "=" not in t and t not in _makefile_targets()]
        assert not missing, f"{context}: no make target {missing}"
        return
    if command.script:
        assert (REPO / command.script).is_file(), f"{context}: {command.script} does not exist"
    launch = re.search(r"\b(launch/\S+)", command.line)
    if launch:
        assert (REPO / launch.group(1)).is_file(), f"{context}: {launch.group(1)} does not exist"
    assert (REPO / "megatron_dchag" / "cli" / f"{command.kind}.py").is_file(), f"{context}: no such command"
    try:
        parser, argv = command_parser(command.kind, command.argv)
        ns = _parse(parser, argv)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None
    config = getattr(ns, "config", None)
    for token in command.argv:
        if token.endswith((".yaml", ".yml")) and "=" not in token:
            assert (REPO / token).is_file(), f"{context}: {token} does not exist"
    overrides = list(getattr(ns, "overrides", None) or [])
    world_size, sections = None, None
    if _is_entry_point(parser):
        # As the entry point loads it: overrides, then the flags, at the launched world size, with
        # the workload's own config section. Without --config (--skip-train --load RUN) the run's
        # saved config is the base: the overrides must still name real fields.
        overrides += flag_overrides(ns)
        world_size = command.world_size if config else None
        sections = _workload_sections(command.kind)
        given = {o.split("=", 1)[0] for o in overrides}
        if command.elided or config is None:  # what "..." may hold: the data and statistics
            overrides = [f"{name}=elided" for name in ("data.data_path", "data.stats_file") if name not in given] + overrides
    else:
        # A tool reads the config for its data section and makes or reads the rest itself.
        data_path = getattr(ns, "data_path", None)
        if isinstance(data_path, list) and len(data_path) == 1:
            data_path = data_path[0]
        if isinstance(data_path, str):
            overrides.append(f"data.data_path={data_path}")
        overrides.append("data.stats_file=written-by-the-tool")
    if config is None and not getattr(ns, "overrides", None):
        return
    try:
        load_config(str(REPO / config) if config else None, overrides, world_size=world_size,
                    workload_sections=sections)
    except ConfigError as exc:
        raise AssertionError(f"{context}: {exc}") from None


def _is_entry_point(parser: argparse.ArgumentParser) -> bool:
    """A training entry point's parser (training.arguments): the Megatron-style flags and overrides."""
    from megatron_dchag.training.arguments import MEGATRON_FLAGS

    return all(flag in parser._option_string_actions for flag in MEGATRON_FLAGS)


def _workload_sections(kind: str):
    """The config sections of the task an entry point trains (``Task.config_sections``)."""
    module = importlib.import_module(f"megatron_dchag.cli.{kind}")
    if not hasattr(module, "run_entry_point"):
        return None

    class _Task(BaseException):
        def __init__(self, factory):
            super().__init__()
            self.factory = factory

    def capture(argv, task_factory, *args, **kwargs):
        raise _Task(task_factory)

    saved = module.run_entry_point
    module.run_entry_point = capture
    try:
        module.main(["--help"])
    except _Task as got:
        return getattr(got.factory, "config_sections", None)
    finally:
        module.run_entry_point = saved
    return None


# Commands cheap enough to run: their sizes shrunk to a few pixels where they make data.
CHEAP = {"make_synthetic_hyperspectral", "compute_stats", "estimate_memory"}
SHRINK = {"--num-cubes": "3", "--height": "12", "--width": "24"}


def _shrunk(argv: List[str]) -> List[str]:
    out = list(argv)
    for i, token in enumerate(out[:-1]):
        if token in SHRINK:
            out[i + 1] = SHRINK[token]
    return out


def _blocks_with_cheap_commands() -> Dict[str, List[DocCommand]]:
    blocks: Dict[str, List[DocCommand]] = {}
    for c in COMMANDS:
        if c.kind in CHEAP:
            blocks.setdefault(f"{c.where.split(':')[0]}#{c.block}", []).append(c)
    return blocks


@pytest.mark.parametrize("block", sorted(_blocks_with_cheap_commands()))
def test_cheap_commands_run(block, tmp_path, monkeypatch):
    """Each block's cheap commands, in order, in a scratch directory holding the configs and a
    copy of the benchmark results they read; then every relative path a training command of the
    same block names for its data or statistics exists (the block made what it trains on)."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copytree(REPO / "docs" / "bench", tmp_path / "docs" / "bench")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for command in _blocks_with_cheap_commands()[block]:
        module = importlib.import_module(f"megatron_dchag.cli.{command.kind}")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            status = module.main(_shrunk(command.argv))
        assert status in (0, None), f"{command.where}: {command.line}: exit {status}: {err.getvalue()[-1500:]}"
    path_doc, index = block.split("#")
    for command in COMMANDS:
        if not (command.where.startswith(path_doc + ":") and command.block == int(index)) or command.kind == "make":
            continue
        parser, argv = command_parser(command.kind, command.argv)
        if _is_entry_point(parser):
            ns = _parse(parser, argv)
            named = [ns.data_path] + [o.split("=", 1)[1] for o in ns.overrides if o.startswith("data.stats_file=")]
            for name in (n for n in named if n and not os.path.isabs(n)):  # absolute: the user's cluster paths
                assert os.path.exists(name), f"{command.where}: {command.line}: {name} was not made by the block"
