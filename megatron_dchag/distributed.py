"""Process start-up: one entry point for ``torchrun``, ``srun`` and plain ``python``.

:func:`initialize_distributed` is the only function a training script calls to become a rank:

1. :func:`resolve_launch_env` reads the launcher's variables. torchrun's ``RANK``/``WORLD_SIZE``
   (with ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) win; else Slurm's ``SLURM_PROCID``,
   ``SLURM_LOCALID``, ``SLURM_NTASKS`` and the first host of the node list; else one process.
2. The resolved values are exported to ``os.environ`` so torch's ``env://`` rendezvous works.
3. Backend: ``nccl`` (RCCL on ROCm) when a GPU is present, else ``gloo`` plus the CPU
   compatibility layer (:mod:`megatron_dchag.cpu_compat`).
4. ``torch.distributed.init_process_group`` (an existing process group is reused), a clear error if
   the world size is not divisible by TP x PP, megatron-core's ``initialize_model_parallel``.
5. Seeds: python ``random``, numpy and torch get the *same* seed on every rank (replicated
   weights are initialised identically everywhere), then megatron's
   ``model_parallel_cuda_manual_seed`` sets up the tensor-parallel RNG tracker.

:func:`destroy_distributed` undoes 4; :func:`describe_parallel_layout` lists every rank's place.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, MutableMapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_dchag.cpu_compat import install_cpu_compat

__all__ = [
    "LaunchEnv",
    "describe_parallel_layout",
    "destroy_distributed",
    "expand_hostlist",
    "find_free_port",
    "initialize_distributed",
    "resolve_launch_env",
    "seed_everything",
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


# --------------------------------------------------------------------------------------------
# Start-up and tear-down
# --------------------------------------------------------------------------------------------


def _check_divisible(world_size: int, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(
            f"tensor_model_parallel_size ({tp}) and pipeline_model_parallel_size ({pp}) "
            "must be >= 1"
        )
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"World size {world_size} is not divisible by tensor_model_parallel_size {tp} x "
            f"pipeline_model_parallel_size {pp} = {tp * pp}"
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank, then megatron's TP RNG tracker."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: int = 10,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
) -> LaunchEnv:
    """Make this process a rank of a megatron-core job (torchrun, srun or plain python).

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size; data parallel size is world / (TP x PP).
        seed: seed for python, numpy, torch (the same on every rank) and megatron's RNG tracker.
        backend: process-group backend; default ``nccl`` with a GPU (CUDA or ROCm), else ``gloo``.
        timeout_minutes: collective timeout.
        virtual_pipeline_model_parallel_size: interleaved pipeline stages per rank.

    Returns:
        The resolved :class:`LaunchEnv` (rank and world size of the process group).

    Raises:
        ValueError: if the world size is not divisible by TP x PP (before any process group is
            created), or the launcher's variables are inconsistent.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if dist.is_available() and dist.is_initialized():
        # Reuse the existing group (tests, notebooks); it is the truth for rank and size.
        env = resolve_launch_env()
        env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
    else:
        env = resolve_launch_env()
    _check_divisible(env.world_size, tp, pp)
    env.export()

    has_gpu = torch.cuda.is_available()
    if has_gpu:
        # With `srun --gpu-bind=closest` each task sees one GPU, so LOCAL_RANK may exceed the count.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        install_cpu_compat()

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if has_gpu else "gloo"),
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)

    layout = describe_parallel_layout()  # collective: every rank takes part
    if env.rank == 0:
        print(layout, flush=True)
    return env


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel state and the default process group (if any)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe_parallel_layout() -> str:
    """Every rank's TP/PP/DP rank and group members, as a table (collective over all ranks).

    Must be called on every rank after :func:`initialize_distributed`; the text is the same on
    all ranks.
    """
    mine = {
        "rank": dist.get_rank(),
        "host": socket.gethostname(),
        "tp": (parallel_state.get_tensor_model_parallel_rank(),
               dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())),
        "pp": (parallel_state.get_pipeline_model_parallel_rank(),
               dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())),
        "dp": (parallel_state.get_data_parallel_rank(),
               dist.get_process_group_ranks(parallel_state.get_data_parallel_group())),
    }
    everyone: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)

    world = dist.get_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    dp_size = parallel_state.get_data_parallel_world_size()
    lines = [
        f"Parallel layout: world {world} = TP {tp_size} x PP {pp_size} x DP {dp_size} "
        f"(backend {dist.get_backend()})",
        f"  {'rank':>5}  " + "".join(
            f"{name:<7}{name + ' group':<18}" for name in ("TP", "PP", "DP")
        ) + "host",
    ]
    for info in everyone:
        assert info is not None
        cells = []
        for key, size in (("tp", tp_size), ("pp", pp_size), ("dp", dp_size)):
            rank_in_group, members = info[key]
            cells.append(f"{f'{rank_in_group}/{size}':<7}{_format_ranks(members):<18}")
        lines.append(f"  {info['rank']:>5}  " + "".join(cells) + info["host"])
    return "\n".join(lines)


def _format_ranks(ranks: List[int], limit: int = 6) -> str:
    """``[0, 2]``; long groups as ``[0, 8, ..., 504] (64)``."""
    if len(ranks) <= limit:
        return str(list(ranks))
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)})"
