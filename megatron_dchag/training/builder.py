"""Everything a run trains with, built from a resolved config and a task: model chunks, bf16 and
megatron DDP wrapping, optimizer, LR/WD scheduler and the schedule hooks.

This is the one place models are built: the trainer, checkpoint conversion, the plot tools and any
inference code call it, so they all get the model the run trained. The order of construction is
part of the numerics: megatron draws each TP layer's initial weights in creation order, so chunks
are built first-to-last, then wrapped, then the optimizer is made.

- :func:`build_model_chunks`: this rank's pipeline chunks (one, or one per virtual stage under the
  interleaved schedule), each with its pre-/post-process flags, on :func:`~megatron_dchag.device.compute_device`.
- :func:`build_training_components`: chunks + ``Float16Module`` (``training.bf16``) +
  ``DistributedDataParallel`` (or, with ``parallel.use_torch_fsdp2`` and DP > 1, megatron-core's
  ``TorchFullyShardedDataParallel``, see :func:`wrap_torch_fsdp2`) + ``get_megatron_optimizer``
  (with the compat shims) + ``OptimizerParamScheduler``, and the hooks the schedules read from the
  model config.
- :func:`build_single_model`: one whole, unwrapped model of this TP rank on the CPU (PP = 1), for
  inference, export and plotting.

The task's data checks (:meth:`~megatron_dchag.tasks.base.Task.prepare`) are the caller's: they
may fill in config fields from the data (e.g. ``model.wavelengths``), and tools that rebuild a
model from a checkpoint's config skip them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List

import torch

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    TorchFullyShardedDataParallel,
    TorchFullyShardedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_dchag.compat.megatron import (
    initialize_torch_adam_state,
    patch_distributed_optimizer_for_torch_adam,
    patch_torch_fsdp2_finish_grad_sync,
)
from megatron_dchag.config import ExperimentConfig, run_shape
from megatron_dchag.device import compute_device
from megatron_dchag.layers.channel_stage import ChannelAggregationStage
from megatron_dchag.layers.heads import ChannelParallelHead
from megatron_dchag.tasks.base import Task

# The submodules that become FSDP units (their parameters are all-gathered just before their
# forward and backward and freed after): every transformer layer (megatron's default unit; the
# backbone's and the MAE decoder's), the channel stage (tokenizer, aggregation tree and final
# cross-attention: the parameters that grow with the channel count) and the channel-parallel head.
# Everything else (position and lead-time embeddings, final norms, the MAE decoder's embedding and
# mask token) is a few vectors per model and stays in the root unit.
FSDP_UNITS = (TransformerLayer, ChannelAggregationStage, ChannelParallelHead)


@dataclass
class TrainingComponents:
    """What the training loop runs: ``models`` are this rank's DDP-wrapped chunks (first to last
    virtual stage); ``forward_backward`` is megatron's schedule for the layout; ``model_config`` is
    the chunks' shared ``TransformerConfig``, carrying the schedule hooks."""

    models: List[torch.nn.Module]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    forward_backward: Callable
    model_config: TransformerConfig


def _set_virtual_stage(index: int) -> None:
    # Models read their virtual stage from here (megatron's TransformerBlock needs it); the setter
    # is deprecated upstream in favour of passing vp_stage, which the chunks also get.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parallel_state.set_virtual_pipeline_model_parallel_rank(index)


def build_model_chunks(cfg: ExperimentConfig, task: Task) -> List[torch.nn.Module]:
    """This rank's model chunks, unwrapped, on the compute device: one per virtual pipeline stage
    (``parallel.virtual_pipeline_model_parallel_size`` when PP > 1), else one. Each knows its
    ``vp_stage`` and whether it holds the first (``pre_process``) and last (``post_process``) layers."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    vpp = vpp if pp > 1 else None
    chunks: List[torch.nn.Module] = []
    for i in range(vpp or 1):
        if vpp:
            _set_virtual_stage(i)
        vp_stage = i if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage) if pp > 1 else True
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage) if pp > 1 else True
        chunk = task.build_model(pre_process=pre, post_process=post).to(compute_device())
        chunk.vp_stage = vp_stage
        # megatron's finalize_model_grads asks every pipelined model whether the first and last
        # stages share an embedding; these models have none to share.
        if not hasattr(chunk, "share_embeddings_and_output_weights"):
            chunk.share_embeddings_and_output_weights = False
        chunks.append(chunk)
    if vpp:
        _set_virtual_stage(0)
    return chunks


def build_training_components(cfg: ExperimentConfig, task: Task) -> TrainingComponents:
    """Chunks, bf16 wrapping, DDP or FSDP (parameters broadcast across DP replicas), optimizer,
    scheduler and schedule hooks for ``cfg`` (resolved) and ``task``, inside an initialized
    ``parallel_state``."""
    tr, par = cfg.training, cfg.parallel
    chunks = build_model_chunks(cfg, task)
    config = chunks[0].config
    if tr.bf16:
        chunks = [Float16Module(config, m) for m in chunks]
    if uses_torch_fsdp2(cfg):
        models = [wrap_torch_fsdp2(config, m, par.fsdp_reshard_after_forward) for m in chunks]
    else:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=par.overlap_grad_reduce,
            use_distributed_optimizer=par.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        models = [DistributedDataParallel(config, ddp_config, m, disable_bucketing=(i > 0))
                  for i, m in enumerate(chunks)]
        for m in models:
            m.broadcast_params()  # identical start across DP replicas
    opt_config = OptimizerConfig(
        optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
        adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps,
        clip_grad=tr.clip_grad, bf16=tr.bf16, params_dtype=torch.float32,
        use_distributed_optimizer=par.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, models, config_overrides=learning_rate_overrides(cfg, task, opt_config))
    # Checkpoint loading (resume, checkpoint conversion) needs both of these.
    patch_distributed_optimizer_for_torch_adam(optimizer)
    initialize_torch_adam_state(optimizer)
    scheduler = build_scheduler(cfg, optimizer)
    # Schedules take these hooks from the model config.
    config.no_sync_func = [m.no_sync for m in models] if len(models) > 1 else models[0].no_sync
    config.grad_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return TrainingComponents(models=models, optimizer=optimizer, scheduler=scheduler,
                              forward_backward=get_forward_backward_func(), model_config=config)


def learning_rate_overrides(cfg: ExperimentConfig, task: Task, opt_config: OptimizerConfig):
    """megatron-core's parameter-group overrides for the task's
    :meth:`~megatron_dchag.tasks.base.Task.learning_rate_multipliers` (peak and final learning
    rate scaled per name pattern, weight decay skipped as megatron-core does by default); None
    (megatron-core's defaults) when the task has none."""
    multipliers = task.learning_rate_multipliers()
    if not multipliers:
        return None
    tr = cfg.training
    overrides = get_standard_config_overrides(opt_config)
    for pattern, factor in multipliers.items():
        # The scheduler reads max_lr and min_lr; lr_mult (which it does not read) is one of the keys
        # megatron-core matches a checkpoint's parameter groups by on resume, so it must tell the
        # groups apart too.
        overrides[ParamKey(name=pattern)] = ParamGroupOverride(max_lr=tr.lr * factor, min_lr=tr.min_lr * factor,
                                                               lr_mult=factor)
    return overrides


def uses_torch_fsdp2(cfg: ExperimentConfig) -> bool:
    """Whether this run shards its model with FSDP: ``parallel.use_torch_fsdp2`` and DP > 1 (at
    DP = 1 there is nothing to shard over and the setting is ignored, so an FSDP run's config
    also evaluates and converts on one process)."""
    return bool(cfg.parallel.use_torch_fsdp2) and parallel_state.get_data_parallel_world_size() > 1


def wrap_torch_fsdp2(config: TransformerConfig, module: torch.nn.Module,
                     reshard_after_forward: bool = True) -> TorchFullyShardedDataParallel:
    """``module`` (a chunk, or its ``Float16Module``) sharded over the data-parallel group with
    megatron-core's ``TorchFullyShardedDataParallel`` (torch FSDP2 ``fully_shard``), the units
    being :data:`FSDP_UNITS` plus the root.

    Every parameter is first broadcast from the first rank of the DP group, as DDP does, so the
    shards come from one set of weights. After wrapping, each parameter is a ``DTensor`` sharded
    along dim 0 over the DP ranks (``Shard(0)``) whose local part is the TP-local tensor's rows of
    this DP rank; megatron's attributes on it (``tensor_model_parallel``, the channel-group layout
    of D-CHAG parameters) are kept. FSDP2 reduce-scatters (averages) the gradients over DP during
    the backward, after every micro-batch, into sharded ``.grad`` tensors that accumulate across
    micro-batches.
    """
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    src = torch.distributed.get_process_group_ranks(group)[0]
    with torch.no_grad():
        for p in module.parameters():
            torch.distributed.broadcast(p.data, src=src, group=group)
    fsdp_config = TorchFullyShardedDataParallelConfig(
        reshard_after_forward=reshard_after_forward, check_for_nan_in_grad=False,
    )
    model = TorchFullyShardedDataParallel(config, fsdp_config, module, sub_modules_to_wrap=set(FSDP_UNITS))
    patch_torch_fsdp2_finish_grad_sync(model)
    return model


def build_scheduler(cfg: ExperimentConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Linear warm-up over ``training.lr_warmup_iters``, then ``training.lr_decay_style`` decay to
    ``training.min_lr`` at ``training.train_iters``; constant weight decay. Steps count samples."""
    tr = cfg.training
    global_batch_size = run_shape(cfg, parallel_state.get_data_parallel_world_size()).global_batch_size
    # megatron requires warm-up < decay; a run shorter than its warm-up just never leaves it
    decay_steps = max(tr.train_iters, tr.lr_warmup_iters + 1) * global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if tr.lr_warmup_iters else tr.lr,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=tr.lr_warmup_iters * global_batch_size,
        lr_decay_steps=decay_steps,
        lr_decay_style=tr.lr_decay_style,
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def build_single_model(cfg: ExperimentConfig, task: Task) -> torch.nn.Module:
    """The whole model (pre- and post-process) of this TP rank, unwrapped, in fp32 on the CPU, as
    training builds it; for inference, export and plotting. Needs PP = 1."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp != 1:
        raise ValueError(f"build_single_model needs pipeline_model_parallel_size=1 (this process has {pp})")
    return task.build_model(pre_process=True, post_process=True)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The task's model inside its DDP and ``Float16Module`` wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
