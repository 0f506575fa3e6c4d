"""Process start-up: one entry point for ``torchrun``, ``srun`` and plain ``python``.

:func:`initialize_distributed` is the only function a training script calls to become a rank:

1. :func:`resolve_launch_env` reads the launcher's variables. torchrun's ``RANK``/``WORLD_SIZE``
   (with ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) win; else Slurm's ``SLURM_PROCID``,
   ``SLURM_LOCALID``, ``SLURM_NTASKS`` and the first host of the node list; else one process.
2. The resolved values are exported to ``os.environ`` so torch's ``env://`` rendezvous works.
3. Backend: ``nccl`` (RCCL on ROCm) when a GPU is present, else ``gloo`` plus the CPU
   compatibility layer (:mod:`megatron_dchag.compat.cpu`).
4. ``torch.distributed.init_process_group`` (an existing process group is reused), a clear error if
   the world size is not divisible by TP x PP, megatron-core's ``initialize_model_parallel``.
5. Seeds: python ``random``, numpy and torch get the *same* seed on every rank (replicated
   weights are initialised identically everywhere), then megatron's
   ``model_parallel_cuda_manual_seed`` sets up the tensor-parallel RNG tracker.

:func:`destroy_distributed` undoes 4; :func:`describe_parallel_layout` lists every rank's place
and :func:`describe_channel_layout` which channels every TP rank owns (the trainer prints both).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import random
import socket
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_dchag.compat.cpu import install_cpu_compat
from megatron_dchag.launch_env import (  # noqa: F401  (re-exported: the launch side lives there)
    DEFAULT_MASTER_PORT,
    LaunchEnv,
    expand_hostlist,
    find_free_port,
    local_rank_start_method,
    overriding_environ,
    resolve_launch_env,
)

__all__ = [
    "LaunchEnv",
    "describe_channel_layout",
    "describe_parallel_layout",
    "destroy_distributed",
    "expand_hostlist",
    "find_free_port",
    "initialize_distributed",
    "local_rank_start_method",
    "overriding_environ",
    "resolve_launch_env",
    "seed_everything",
    "single_rank_job",
]


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
        virtual_pipeline_model_parallel_size: interleaved pipeline stages per rank (ignored at PP = 1).

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
        # interleaving needs stages: ignored at PP = 1 (a config trained with it then still runs at PP = 1)
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size if pp > 1 else None,
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


@contextlib.contextmanager
def single_rank_job(seed: int = 1234) -> Iterator[None]:
    """This process as the one rank of a TP = PP = 1 job on this machine (for tools that need
    megatron-core's parallel state, e.g. a one-rank conversion step or a benchmark), whatever
    launcher variables it inherited; quiet (no layout table), torn down and those variables
    restored on exit."""
    with overriding_environ(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0", LOCAL_RANK="0",
                            WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", SLURM_PROCID=None, SLURM_NTASKS=None,
                            SLURM_LOCALID=None):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                initialize_distributed(1, 1, seed=seed)
            yield
        finally:
            destroy_distributed()


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


def _span(lo: int, hi: int, names: Optional[Sequence[str]] = None) -> str:
    """``"126-251 (126)"``; with names ``"t_50..u_1000 (126)"``; ``"-"`` when empty."""
    if hi <= lo:
        return "- (0)"
    if names is not None:
        first, last = names[lo], names[hi - 1]
        return f"{first} ({hi - lo})" if hi - lo == 1 else f"{first}..{last} ({hi - lo})"
    return f"{lo} (1)" if hi - lo == 1 else f"{lo}-{hi - 1} ({hi - lo})"


def describe_channel_layout(
    plan,
    shards_channels: bool = True,
    strategy: str = "dchag",
    output_plan=None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
) -> str:
    """Which channel groups and channels every TP rank owns, as a table (pure; no communication).

    Args:
        plan: the model's :class:`~megatron_dchag.layers.channel_plan.ChannelGroupPlan` (any rank's;
            only the global partition and the TP size are used).
        shards_channels: whether a rank tokenizes only its own channels (``dchag``,
            ``dist_tokenize``); otherwise every rank reads all of them.
        strategy: the model's strategy, for the heading.
        output_plan: the plan of the head's output channels when it differs from ``plan``
            (forecasting a subset of the inputs); default ``plan``.
        input_names, output_names: channel names (e.g. ERA5 ``z_500``), shown instead of indices.
    """
    output_plan = output_plan or plan
    sizes = plan.group_sizes
    distinct = sorted(set(sizes), reverse=True)
    size_text = ", ".join(f"{s} x{sizes.count(s)}" for s in distinct)
    tp = plan.tp_size
    lines = [
        f"Channel layout: {plan.num_channels} channels in G={plan.num_groups} groups (sizes {size_text}), "
        f"strategy {strategy}, TP {tp}: each TP rank "
        + ("tokenizes only its own groups" if shards_channels else "tokenizes all channels")
        + " and predicts only its own channels (the same on every PP stage and DP replica)",
        f"  {'TP rank':>7}  {'groups':<10}{'input channels':<28}{'output channels (head)'}",
    ]
    for r in range(tp):
        groups = plan.rank_groups(r)
        group_text = f"{groups[0]}" if len(groups) == 1 else f"{groups[0]}-{groups[-1]}"
        lo, hi = plan.rank_channel_range(r) if shards_channels else (0, plan.num_channels)
        olo, ohi = output_plan.rank_channel_range(r)
        lines.append(f"  {r:>7}  {group_text:<10}{_span(lo, hi, input_names):<28}{_span(olo, ohi, output_names)}")
    return "\n".join(lines)


def _format_ranks(ranks: List[int], limit: int = 6) -> str:
    """``[0, 2]``; long groups as ``[0, 8, ..., 504] (64)``."""
    if len(ranks) <= limit:
        return str(list(ranks))
    return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)})"
