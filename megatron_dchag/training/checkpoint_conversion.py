"""Offline checkpoint conversion: resharding, portable export/import, inspection.

Each rank-level function below runs inside an initialized megatron ``parallel_state`` (one process
per rank of the *target* layout; :func:`run_on_local_ranks` starts them on this machine with gloo,
or runs the only one in this process).
The model is rebuilt from the checkpoint's own ``config.yaml`` and the task name it recorded, by
the same builder as training (:mod:`megatron_dchag.training.builder`), so the same code converts
MAE and forecasting checkpoints without being told which is which.

- :func:`reshard_rank`: load model, optimizer, scheduler and data position under the target
  layout (dist_checkpointing reshards on load) and save them again there.
- :func:`export_rank`: one process at TP=PP=1; writes all weights, unsharded, to one safetensors
  file with the model config, task, iteration and (when the checkpoint has it) the normalization
  record (``normalization``, the JSON of :mod:`megatron_dchag.data.normalization`) as metadata.
- :func:`import_rank`: the reverse, into a weights-only checkpoint (TP=PP=1; reshard afterwards
  for another layout).
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import yaml

from megatron_dchag.config import (
    ConfigError,
    ExperimentConfig,
    build_dataclass,
    config_to_dict,
    resolve_config,
    validate_config,
)
from megatron_dchag.tasks.registry import task_class
from megatron_dchag.training.builder import build_single_model, build_training_components
from megatron_dchag.training.checkpointing import (
    CheckpointError,
    TrainingState,
    load_checkpoint,
    read_checkpoint_config,
    read_checkpoint_normalization,
    resolve_checkpoint_dir,
    save_checkpoint,
)

EXPORT_FORMAT = "megatron_dchag.portable"
EXPORT_VERSION = "1"


# ----------------------------------------------------------------------------------------------
# Reading what a checkpoint is
# ----------------------------------------------------------------------------------------------


def saved_checkpoint_config(load: str) -> Tuple[str, Dict[str, Any]]:
    """(checkpoint dir, saved config dict) of ``load`` (a save directory or an ``iter_*`` one);
    CheckpointError when it holds no config.yaml."""
    ckpt = resolve_checkpoint_dir(load)
    config = read_checkpoint_config(ckpt)
    if config is None:
        raise CheckpointError(f"'{ckpt}' has no config.yaml: not a megatron_dchag checkpoint")
    return ckpt, config


def checkpoint_description(load: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(checkpoint dir, saved config dict, training state dict) without building anything."""
    from megatron.core import dist_checkpointing

    ckpt, config = saved_checkpoint_config(load)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    return ckpt, config, dict(common.get("training_state") or {})


SAVED = "saved"  # config_for_layout: keep the checkpoint's virtual pipeline size


def config_for_layout(saved: Dict[str, Any], tp: int, pp: int, vpp: Union[int, None, str] = SAVED,
                      task: Optional[str] = None) -> ExperimentConfig:
    """The saved config, resolved, moved to another TP x PP (x VPP) layout; G stays the saved one.

    Validated as the run would be: ``task`` (the checkpoint's task name) selects the workload
    sections checked, as the entry script does; unknown or ``None``: all of them.

    ``vpp``: the virtual pipeline size at the target (``None`` or 0: no interleaving); by default
    the saved one is kept where it still fits (PP > 1). The saved ``pipeline_layer_split`` is kept
    when it has one entry per target stage (PP or PP x VPP entries), else the layers are split
    evenly.
    """
    # Resolved at the saved layout first: a config saved with channel_groups null (G = the TP size at
    # creation) keeps that G at the target TP size.
    cfg = resolve_config(build_dataclass(ExperimentConfig, saved))
    par = cfg.parallel
    par.tensor_model_parallel_size = tp
    par.pipeline_model_parallel_size = pp
    keep_saved = vpp == SAVED
    par.virtual_pipeline_model_parallel_size = (par.virtual_pipeline_model_parallel_size if keep_saved else vpp) or None
    if pp == 1:
        par.virtual_pipeline_model_parallel_size = None
    stages = pp * (par.virtual_pipeline_model_parallel_size or 1)
    if par.pipeline_layer_split is not None and (pp == 1 or len(par.pipeline_layer_split) not in (pp, stages)):
        par.pipeline_layer_split = None
    if par.sequence_parallel and tp == 1:
        par.sequence_parallel = False
    cfg.training.load = cfg.training.save = None
    try:
        validate_config(cfg, world_size=tp * pp, workload_sections=_workload_sections(task))
    except ConfigError as exc:
        if keep_saved and par.virtual_pipeline_model_parallel_size:
            raise ConfigError(f"{exc} [the checkpoint's virtual pipeline size "
                              f"{par.virtual_pipeline_model_parallel_size} was kept; give another with "
                              "--target-virtual-pipeline-model-parallel-size, 0 for none]") from None
        raise
    return cfg


def _workload_sections(task: Optional[str]) -> Optional[Tuple[str, ...]]:
    try:
        return task_class(task).config_sections if task else None
    except KeyError:  # a task this version does not know: validate every section
        return None


def _task(cfg: ExperimentConfig, name: Optional[str]):
    if not name:
        raise CheckpointError("the checkpoint does not record its task (saved by an older version)")
    return task_class(name)(cfg)


# ----------------------------------------------------------------------------------------------
# Rank-level work
# ----------------------------------------------------------------------------------------------


def reshard_rank(load: str, save: str, tp: int, pp: int, vpp: Union[int, None, str] = SAVED) -> int:
    from megatron.core import parallel_state

    _, saved, state = checkpoint_description(load)
    cfg = config_for_layout(saved, tp, pp, vpp, task=state.get("task"))
    built = build_training_components(cfg, _task(cfg, state.get("task")))  # from the config alone, no data
    weights_only = not state.get("has_optimizer", True)
    optimizer, scheduler = (None, None) if weights_only else (built.optimizer, built.scheduler)
    loaded = load_checkpoint(load, built.models, optimizer, scheduler, load_rng=False)
    loaded.layout = dict(tp=tp, pp=pp, dp=parallel_state.get_data_parallel_world_size())
    loaded.has_optimizer = not weights_only
    save_checkpoint(save, loaded.iteration, built.models, optimizer, scheduler, loaded, config_to_dict(cfg),
                    normalization=read_checkpoint_normalization(resolve_checkpoint_dir(load)))
    return loaded.iteration


def _single_model(cfg: ExperimentConfig, task_name: str) -> torch.nn.Module:
    return build_single_model(cfg, _task(cfg, task_name))


def export_rank(load: str, out_file: str) -> Dict[str, Any]:
    from safetensors.torch import save_file

    _, saved, state = checkpoint_description(load)
    cfg = config_for_layout(saved, 1, 1, task=state.get("task"))
    model = _single_model(cfg, state.get("task"))
    load_checkpoint(load, [model], load_rng=False)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "task": str(state.get("task")),
        "iteration": str(state.get("iteration", 0)),
        "config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120),
    }
    normalization = read_checkpoint_normalization(resolve_checkpoint_dir(load))
    if normalization is not None:
        metadata["normalization"] = normalization
    directory = os.path.dirname(os.path.abspath(out_file))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out_file)}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):  # a failed write leaves nothing behind
            os.remove(tmp)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}


def read_portable(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"portable file '{path}' does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"'{path}' was not written by megatron_dchag (metadata format={metadata.get('format')!r})")
    return tensors, metadata


def import_rank(in_file: str, save: str) -> int:
    tensors, metadata = read_portable(in_file)
    cfg = config_for_layout(yaml.safe_load(metadata["config"]), 1, 1, task=metadata.get("task"))
    model = _single_model(cfg, metadata["task"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"'{in_file}' does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    iteration = int(metadata.get("iteration", 0))
    state = TrainingState(iteration=iteration, layout=dict(tp=1, pp=1, dp=1), task=metadata["task"],
                          has_optimizer=False)
    save_checkpoint(save, iteration, [model], None, None, state, config_to_dict(cfg),
                    normalization=metadata.get("normalization"))
    return iteration


# ----------------------------------------------------------------------------------------------
# Running ranks on this machine
# ----------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, tp: int, pp: int, vpp: Optional[int], fn: Callable, args: tuple,
               queue) -> None:
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):  # an enclosing Slurm task's must not win
        os.environ.pop(var, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        import contextlib
        import io
        import warnings

        from megatron_dchag.distributed import destroy_distributed, initialize_distributed

        warnings.filterwarnings("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            initialize_distributed(tp, pp, seed=0, virtual_pipeline_model_parallel_size=vpp)
        result = fn(*args)
        destroy_distributed()
        queue.put((rank, result, None))
    except Exception as exc:
        queue.put((rank, None, (type(exc).__name__, str(exc), traceback.format_exc())))


def _run_in_this_process(fn: Callable, args: tuple) -> Any:
    """A one-rank step (export, import, a TP=PP=1 target) here rather than in a child process, which
    would import torch and megatron-core a second time."""
    import warnings

    from megatron_dchag.distributed import single_rank_job

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with single_rank_job(seed=0):
            return fn(*args)


def run_on_local_ranks(world_size: int, tp: int, pp: int, fn: Callable, *args: Any, vpp: Optional[int] = None) -> Any:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks of this machine (a TP x PP layout, ``vpp``
    virtual pipeline stages per rank); returns rank 0's result.

    A user error on any rank is re-raised here as the same kind of error (ConfigError,
    CheckpointError) with its message. One rank runs in this process."""
    if world_size == 1:
        return _run_in_this_process(fn, args)
    import torch.multiprocessing as mp

    from megatron_dchag.distributed import find_free_port, local_rank_start_method

    # a fork server that imported this module (torch, megatron-core, the builder) once
    ctx = mp.get_context(local_rank_start_method([__name__]))
    queue = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, tp, pp, vpp, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world_size):
        rank, result, err = queue.get()
        if err is not None:
            errors.append((rank, err))
            break
        results[rank] = result
    for p in procs:
        if errors:
            p.kill()
        p.join()
    if errors:
        rank, (kind, message, tb) = errors[0]
        error_type = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(kind)
        if error_type is not None:
            raise error_type(message)
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return results[0]
