"""Where this process sits in a job, from the launcher's environment (torchrun, srun, python).

Pure Python (no torch, no megatron-core), so launch scripts can use it cheaply:

    python -m megatron_dchag.launch_env                  # JSON: rank, local_rank, world_size, master_addr, ...
    python -m megatron_dchag.launch_env --first-host "$SLURM_JOB_NODELIST"   # the rendezvous host

:func:`resolve_launch_env` is what :func:`megatron_dchag.distributed.initialize_distributed` uses;
``megatron_dchag.distributed`` re-exports everything here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Iterator, List, Mapping, MutableMapping, Optional, Sequence

__all__ = [
    "DEFAULT_MASTER_PORT",
    "LaunchEnv",
    "expand_hostlist",
    "find_free_port",
    "resolve_launch_env",
]

DEFAULT_MASTER_PORT = 29500
# Ports derived from SLURM_JOB_ID lie in [10000, 30000): below Linux's ephemeral range.
_SLURM_PORT_BASE = 10000
_SLURM_PORT_SPAN = 20000


@dataclass
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "srun" or "python"

    def export(self, environ: Optional[MutableMapping[str, str]] = None) -> None:
        """Write the variables torch's ``env://`` rendezvous reads."""
        environ = os.environ if environ is None else environ
        environ["RANK"] = str(self.rank)
        environ["LOCAL_RANK"] = str(self.local_rank)
        environ["WORLD_SIZE"] = str(self.world_size)
        environ["MASTER_ADDR"] = self.master_addr
        environ["MASTER_PORT"] = str(self.master_port)


# --------------------------------------------------------------------------------------------
# Launch environment
# --------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in Slurm host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in Slurm host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str, hostlist: str) -> List[str]:
    """``"00012-00015,00020"`` -> ``["00012", ..., "00015", "00020"]`` (zero padding kept)."""
    values = []
    for item in spec.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"Cannot parse range {item!r} in Slurm host list {hostlist!r}")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"Descending range {item!r} in Slurm host list {hostlist!r}")
        width = len(lo)
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return values


def _expand_host_pattern(pattern: str, hostlist: str) -> List[str]:
    """Expand one host pattern; several bracket groups give their Cartesian product."""
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[: match.start()], pattern[match.end():]
    return [
        host
        for value in _expand_range_list(match.group(1), hostlist)
        for host in _expand_host_pattern(prefix + value + suffix, hostlist)
    ]


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a Slurm host list, e.g. ``"frontier[00012-00015,00020],login1"``.

    Handles plain ``"host1,host2"``, bracketed ranges and lists with their zero padding
    (``"nid[001-002]"`` -> ``["nid001", "nid002"]``) and several bracket groups per host
    (``"r[1-2]n[1-2]"`` -> ``["r1n1", "r1n2", "r2n1", "r2n2"]``). Pure python: no ``scontrol``.
    """
    return [
        host
        for pattern in _split_top_level(hostlist)
        for host in _expand_host_pattern(pattern, hostlist)
    ]


@contextlib.contextmanager
def overriding_environ(**values: Optional[str]) -> Iterator[None]:
    """``os.environ`` with ``values`` inside the block (``None``: the variable unset), and as it
    was before afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_rank_start_method(preload: Sequence[str]) -> str:
    """How a tool starts ranks on this machine: ``forkserver`` with ``preload`` (modules importing
    torch and megatron-core) imported once in the server, so a rank costs a fork rather than an
    import, and its children start clean (the server initializes no GPU and no process group);
    ``spawn`` where there is no fork server."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(list(preload))
    return "forkserver"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer") from None


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    job_id = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", ""))
    if job_id.isdigit():
        return _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN
    return DEFAULT_MASTER_PORT


def _validate(env: LaunchEnv) -> LaunchEnv:
    if env.world_size < 1:
        raise ValueError(f"World size must be >= 1, got {env.world_size} ({env.launcher})")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(
            f"Rank {env.rank} is outside [0, {env.world_size}) (world size {env.world_size}, "
            f"{env.launcher})"
        )
    if env.local_rank < 0:
        raise ValueError(f"Local rank must be >= 0, got {env.local_rank} ({env.launcher})")
    if not 0 < env.master_port < 65536:
        raise ValueError(f"MASTER_PORT must be in 1..65535, got {env.master_port}")
    return env


def resolve_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Work out rank, world size and rendezvous address from the launcher's variables.

    Precedence:

    * **torchrun** (also any launcher exporting the same names): ``RANK`` and ``WORLD_SIZE``,
      with ``LOCAL_RANK`` (default 0), ``MASTER_ADDR`` (default 127.0.0.1) and ``MASTER_PORT``
      (default 29500).
    * **srun**: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS`` (or ``SLURM_NPROCS``);
      ``MASTER_ADDR`` defaults to the first host of ``SLURM_STEP_NODELIST`` (where task 0 of the
      step runs), else ``SLURM_JOB_NODELIST``, else ``SLURM_NODELIST``; ``MASTER_PORT`` defaults to
      a port derived from ``SLURM_JOB_ID`` (so concurrent jobs on shared nodes differ), else 29500.
      ``MASTER_ADDR``/``MASTER_PORT`` set in the environment are respected.
    * **python**: one process, rank 0, ``MASTER_ADDR`` 127.0.0.1 and a free port (or the values of
      ``MASTER_ADDR``/``MASTER_PORT`` if set).
    """
    has_rank, has_world = "RANK" in environ, "WORLD_SIZE" in environ
    if has_rank != has_world:
        present, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise ValueError(
            f"{present} is set but {missing} is not: set both (torchrun does) or neither"
        )

    if has_rank:
        env = LaunchEnv(
            rank=_int_var(environ, "RANK"),
            local_rank=_int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            world_size=_int_var(environ, "WORLD_SIZE"),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=(
                _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ
                else DEFAULT_MASTER_PORT
            ),
            launcher="torchrun",
        )
        return _validate(env)

    if "SLURM_PROCID" in environ:
        ntasks_var = next((v for v in ("SLURM_NTASKS", "SLURM_NPROCS") if v in environ), None)
        if ntasks_var is None:
            raise ValueError("SLURM_PROCID is set but neither SLURM_NTASKS nor SLURM_NPROCS is")
        if "MASTER_ADDR" in environ:
            master_addr = environ["MASTER_ADDR"]
        else:
            nodelist_var = next(
                (v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                 if environ.get(v)),
                None,
            )
            if nodelist_var is None:
                raise ValueError(
                    "Running under Slurm but no node list (SLURM_JOB_NODELIST / SLURM_NODELIST)"
                    " and no MASTER_ADDR: cannot find the rendezvous host"
                )
            hosts = expand_hostlist(environ[nodelist_var])
            if not hosts:
                raise ValueError(f"{nodelist_var}={environ[nodelist_var]!r} lists no host")
            master_addr = hosts[0]
        env = LaunchEnv(
            rank=_int_var(environ, "SLURM_PROCID"),
            local_rank=_int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            world_size=_int_var(environ, ntasks_var),
            master_addr=master_addr,
            master_port=(
                _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ
                else _slurm_master_port(environ)
            ),
            launcher="srun",
        )
        return _validate(env)

    master_addr = environ.get("MASTER_ADDR", "127.0.0.1")
    env = LaunchEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        master_addr=master_addr,
        master_port=(
            _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ
            else find_free_port()
        ),
        launcher="python",
    )
    return _validate(env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dchag.launch_env",
        description="Print how this process maps onto the job (as JSON), or the first host of a Slurm node list.",
    )
    parser.add_argument("--first-host", metavar="NODELIST", help="print the first host of a Slurm node list and exit")
    parser.add_argument("--expand", metavar="NODELIST", help="print every host of a Slurm node list, one a line")
    args = parser.parse_args(argv)
    try:
        if args.first_host is not None:
            hosts = expand_hostlist(args.first_host)
            if not hosts:
                raise ValueError(f"node list {args.first_host!r} lists no host")
            print(hosts[0])
            return 0
        if args.expand is not None:
            print("\n".join(expand_hostlist(args.expand)))
            return 0
        env = resolve_launch_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dict(asdict(env), hostname=socket.gethostname())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
