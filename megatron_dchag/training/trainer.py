"""The shared training loop on megatron-core (both workloads).

:class:`Trainer` runs what :func:`~megatron_dchag.training.builder.build_training_components`
built (DDP-wrapped chunks, optimizer, scheduler, megatron-core's ``get_forward_backward_func``
schedule) for a :class:`~megatron_dchag.tasks.base.Task`: resume, the step loop, evaluation,
checkpoints (:mod:`megatron_dchag.training.checkpointing`), logging, clean stops on SIGTERM/SIGINT
or ``--exit-duration-in-mins`` and skipping of non-finite steps.
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron.core import parallel_state

from megatron_dchag.config import (
    ExperimentConfig,
    build_dataclass,
    config_to_dict,
    dump_config,
    resolve_config,
    run_shape,
    summarize_config,
)
from megatron_dchag.tasks.base import Task
from megatron_dchag.training import fault_injection
from megatron_dchag.training.builder import TrainingComponents, unwrap_model
from megatron_dchag.training.checkpointing import (
    CheckpointError,
    TrainingState,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from megatron_dchag.training.checkpoint_paths import holds_no_checkpoint_yet
from megatron_dchag.training.stop_signal import STOP_SIGNALS
from megatron_dchag.training.metrics_logger import MetricsLogger, format_train_line, resolve_peak_tflops

# The schedule fields a resumed run takes from its checkpoint unless --override-opt-param-scheduler.
SCHEDULE_FIELDS = ("train_iters", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style")


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint of the last good state was written."""


def peak_memory_bytes() -> int:
    """Allocator peak on GPU; on CPU the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _first_few(items: List[str], shown: int = 3) -> str:
    """``a, b, c and 4 more`` for a message that must stay one line."""
    text = ", ".join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class Trainer:
    """Trains ``task`` under ``cfg``, the config object the task shares, with ``components`` built
    for them. The entry point resolves the config first (:func:`~megatron_dchag.config.resolve_config`),
    so the saved ``config.yaml`` records G and the other defaults explicitly. ``start_time``
    (``time.time()`` when the run's set-up began, default now) is where ``--exit-duration-in-mins``
    counts from."""

    def __init__(self, cfg: ExperimentConfig, task: Task, components: TrainingComponents, fault_hook=None,
                 start_time: Optional[float] = None):
        self.cfg = cfg
        self.task = task
        self.models = components.models
        self.optimizer = components.optimizer
        self.scheduler = components.scheduler
        self.forward_backward = components.forward_backward
        self.model_config = components.model_config
        self.fault_hook = fault_hook  # tests: injected into checkpoint saves
        tr = cfg.training
        self.rank = dist.get_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.shape = run_shape(cfg, self.dp_size)
        self.micro_batch_size = self.shape.micro_batch_size
        self.global_batch_size = self.shape.global_batch_size
        self.num_microbatches = self.shape.num_microbatches
        self.log_dir = tr.log_dir or tr.save
        self.logger = MetricsLogger(self.log_dir, enabled=self.rank == 0, total_steps=tr.train_iters,
                                    wandb_project=tr.wandb_project, wandb_exp_name=tr.wandb_exp_name,
                                    wandb_save_dir=tr.wandb_save_dir, wandb_config=config_to_dict(cfg))
        self.peak = resolve_peak_tflops(
            tr.peak_tflops, torch.cuda.get_device_name() if torch.cuda.is_available() else None, tr.bf16)
        self.stop = STOP_SIGNALS  # SIGTERM/SIGINT: stop at the next step boundary (stop_signal)
        self.start_time = time.time() if start_time is None else start_time
        self._first_eval_streams: Optional[List[Any]] = None  # built before outputs, used by the first eval
        self._normalization: Optional[str] = None  # saved with each checkpoint; read on the first save

    # ------------------------------------------------------------------------------------------
    def _load(self) -> TrainingState:
        tr = self.cfg.training
        if not tr.load:
            return TrainingState()
        if not (tr.finetune or tr.skip_train) and holds_no_checkpoint_yet(tr.load):
            return TrainingState()  # a first launch with --load X --save X (the entry point said so)
        ckpt = resolve_checkpoint_dir(tr.load)
        saved = read_checkpoint_config(ckpt)
        if saved is not None:
            self._check_architecture(saved, ckpt)
        weights_only = tr.finetune or tr.skip_train
        grids = {}
        if saved is not None:
            m = saved.get("model") or {}
            if m.get("image_size") and m.get("patch_size"):
                grids["saved_grid"] = tuple(s // m["patch_size"] for s in m["image_size"])
                grids["current_grid"] = tuple(s // self.cfg.model.patch_size for s in self.cfg.model.image_size)
        if not weights_only:
            saved_distopt = bool(((saved or {}).get("parallel") or {}).get("use_distributed_optimizer", False))
            if saved is not None and saved_distopt != bool(self.cfg.parallel.use_distributed_optimizer):
                # The two optimizers store different state (the distributed one keeps fp32 master
                # weights and flat per-bucket groups); megatron-core cannot convert between them.
                raise CheckpointError(
                    f"checkpoint '{ckpt}' was saved with parallel.use_distributed_optimizer={str(saved_distopt).lower()}; "
                    "resume with the same setting (any TP/PP/DP layout works), or load the weights only with --finetune"
                )
        if not weights_only:
            self._apply_schedule_choice(saved, ckpt)
        state = load_checkpoint(
            tr.load, self.models,
            optimizer=None if weights_only else self.optimizer,
            scheduler=None if weights_only else self.scheduler,
            load_rng=not weights_only,
            **grids,
        )
        kind = "weights only" if weights_only else f"resuming at iteration {state.iteration}"
        self.logger.info(f"loaded checkpoint {ckpt} ({kind})")
        if tr.skip_train:  # evaluation reports the checkpoint's iteration
            return TrainingState(iteration=state.iteration)
        if weights_only:
            return TrainingState()
        return state

    def _apply_schedule_choice(self, saved: Optional[Dict[str, Any]], where: str) -> None:
        """On resume the scheduler's saved state wins (megatron-core's default), unless
        ``training.override_opt_param_scheduler``; either way, say so when the saved schedule
        differs from this config."""
        tr = self.cfg.training
        self.scheduler.override_opt_param_scheduler = bool(tr.override_opt_param_scheduler)
        theirs = (saved or {}).get("training") or {}
        diffs = [f"{name} {theirs[name]!r} -> {getattr(tr, name)!r}" for name in SCHEDULE_FIELDS
                 if name in theirs and theirs[name] != getattr(tr, name)]
        if not diffs:
            return
        if tr.override_opt_param_scheduler:
            self.logger.info(f"note: the learning-rate schedule differs from checkpoint '{where}' "
                             f"({', '.join(diffs)}); using the command line's (--override-opt-param-scheduler)")
        else:
            self.logger.info(f"note: the learning-rate schedule differs from checkpoint '{where}' "
                             f"({', '.join(diffs)}); the checkpoint's schedule is kept (its lr, warm-up and decay "
                             "length), give --override-opt-param-scheduler to use the command line's")

    def _check_architecture(self, saved: Dict[str, Any], where: str) -> None:
        """Refuse a checkpoint of another architecture, listing every difference. Both configs are
        compared resolved: a checkpoint saved with channel_groups or ffn_hidden_size null means the
        values that run resolved (G = its saved TP size)."""
        ours = config_to_dict(resolve_config(self.cfg))["model"]
        theirs = config_to_dict(resolve_config(build_dataclass(ExperimentConfig, saved or {})))["model"]
        fields = ("num_channels", "channel_groups", "hidden_size", "num_layers", "num_attention_heads",
                  "patch_size", "strategy", "aggregation_layer", "aggregation_tree", "ffn_hidden_size",
                  "lead_time_embedding")
        diffs = []
        for f in fields:
            a, b = theirs.get(f), ours.get(f)
            if a != b:
                diffs.append(f"model.{f}: checkpoint {a!r} vs config {b!r}")
        diffs += self.task.checkpoint_differences(saved or {})
        if diffs:
            raise CheckpointError(f"checkpoint '{where}' is from an incompatible model: " + "; ".join(diffs))

    def _save(self, iteration: int, stream) -> None:
        tr = self.cfg.training
        if not tr.save:
            return
        state = TrainingState(
            iteration=iteration,
            consumed_samples=iteration * self.global_batch_size,
            data_state=stream.state_dict() if stream is not None else None,
            layout=dict(tp=parallel_state.get_tensor_model_parallel_world_size(),
                        pp=parallel_state.get_pipeline_model_parallel_world_size(), dp=self.dp_size),
            task=self.task.name,
        )
        hook = self.fault_hook or fault_injection.save_fault_hook(iteration, self.rank)
        path = save_checkpoint(
            tr.save, iteration, self.models, self.optimizer, self.scheduler, state,
            config_to_dict(self.cfg), keep_last=tr.keep_last_checkpoints, fault_hook=hook,
            normalization=self._normalization_record(),
        )
        self.logger.info(f"saved checkpoint {path}")
        self.logger.record("event", iteration, event="checkpoint", path=path)

    def _normalization_record(self) -> Optional[str]:
        """The run's normalization statistics (``data.stats_file``) as the JSON record each
        checkpoint carries; rank 0 reads the file once, the other ranks write nothing."""
        if self.rank != 0:
            return None
        if self._normalization is None:
            from megatron_dchag.data.normalization import normalization_from_stats_file

            self._normalization = normalization_from_stats_file(self.cfg.data.stats_file).to_json()
        return self._normalization

    # ------------------------------------------------------------------------------------------
    def _seq_length(self) -> int:
        shape = self.task.pipeline_tensor_shape()
        return shape[0] if shape else 1

    def _chunk_streams(self, make) -> List[Any]:
        """One stream per model chunk. Under the interleaved schedule every chunk draws every
        micro-batch from its own iterator, so each chunk gets an identical copy of the stream
        (they stay in step: each takes ``num_microbatches`` per step)."""
        return [make() for _ in self.models]

    def _run_microbatches(self, streams, forward_only: bool, num_microbatches: int,
                          iteration: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        step_func = self.task.forward_step
        if iteration is not None and fault_injection.nonfinite_at(iteration):
            step_func = fault_injection.poison_forward_step(step_func)
        return self.forward_backward(
            forward_step_func=step_func,
            data_iterator=streams if len(self.models) > 1 else streams[0],
            model=self.models if len(self.models) > 1 else self.models[0],
            num_microbatches=num_microbatches,
            seq_length=self._seq_length(),
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_losses(self, records: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Average reported values over micro-batches and DP ranks; broadcast from the last stage."""
        keys = sorted({k for r in records for k in r}) if records else []
        keys_box = [keys]
        last_stage_rank = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())[-1]
        dist.broadcast_object_list(keys_box, src=last_stage_rank, group=parallel_state.get_pipeline_model_parallel_group())
        keys = keys_box[0]
        values = torch.zeros(len(keys) + 1, dtype=torch.float64)
        if records:
            for i, k in enumerate(keys):
                values[i] = sum(float(r[k]) for r in records if k in r) / len(records)
        values[-1] = 1.0 if records else 0.0
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        dist.broadcast(values, src=last_stage_rank, group=parallel_state.get_pipeline_model_parallel_group())
        count = values[-1].item() or 1.0
        return {k: values[i].item() / count for i, k in enumerate(keys)}

    def _nonfinite_step_inputs(self, noted: List[Any]) -> List[str]:
        """What the micro-batches of a non-finite step held, over all ranks: each key (a cube) once
        with its highest-scoring description (largest input first; NaN counts as infinite)."""
        gathered: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, noted)
        best: Dict[str, Any] = {}
        for rank_noted in gathered:
            for score, key, text in rank_noted or []:
                score = math.inf if math.isnan(score) else score
                if key not in best or score > best[key][0]:
                    best[key] = (score, text)
        return [text for _, text in sorted(best.values(), key=lambda entry: -entry[0])]

    def _grads_finite(self) -> bool:
        finite = True
        for m in self.models:
            for p in m.parameters():
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                if isinstance(g, DTensor):  # FSDP: this rank's shard (every rank checks its own)
                    g = g.to_local()
                if g is not None and not torch.isfinite(g).all():
                    finite = False
                    break
        return not _any_rank(not finite)

    def _eval_streams(self) -> List[Any]:
        """Fresh evaluation streams (every evaluation sees the same batches)."""
        return self._chunk_streams(lambda: self.task.eval_stream(self._unwrapped(), self.dp_rank, self.dp_size))

    def evaluate(self, step: int) -> Dict[str, Any]:
        tr = self.cfg.training
        for m in self.models:
            m.eval()
        streams, self._first_eval_streams = self._first_eval_streams or self._eval_streams(), None
        records = []
        try:
            with torch.no_grad():
                for _ in range(tr.eval_iters):
                    records.extend(self._run_microbatches(streams, True, self.num_microbatches))
        finally:
            for s in streams:  # stops their data loader workers (data.num_workers)
                s.close()
        result = self._reduce_losses(records)
        result.update(self.task.evaluate_extra(self._unwrapped(), step))
        for m in self.models:
            m.train()
        rec = self.logger.record("eval", step, **result)
        self.logger.info(f"eval  step {step:>6} | " + " | ".join(
            f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("kind", "step") and "/" not in k))  # per-variable metrics: metrics.jsonl (tasks print tables)
        return rec

    def channel_layout(self) -> str:
        """Which channels each TP rank owns (from the model's channel-group plan)."""
        from megatron_dchag.distributed import describe_channel_layout

        model = self._unwrapped()
        encoder = getattr(model, "encoder", model)
        plan = encoder.plan
        channels = getattr(model, "channels", None)  # forecasting: named input/output channels
        m = self.cfg.model
        return describe_channel_layout(
            plan, m.shards_channels, m.strategy, output_plan=getattr(model, "output_plan", None),
            input_names=getattr(channels, "inputs", None), output_names=getattr(channels, "outputs", None),
        )

    def _unwrapped(self) -> torch.nn.Module:
        return unwrap_model(self.models[0])

    # ------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, tr = self.cfg, self.cfg.training
        # Everything that can reject the input (data and model, checked before the trainer was
        # made; checkpoint; streams) runs before any output is written: a bad input leaves no
        # partial log directory behind.
        state = self._load()
        # The streams open and may read the data (a damaged file is found here, before any output).
        streams = None if tr.skip_train else self._chunk_streams(
            lambda: self.task.train_stream(self._unwrapped(), self.dp_rank, self.dp_size))
        if tr.eval_iters > 0:
            self._first_eval_streams = self._eval_streams()
        self.logger.info("resolved config (long lists shortened; config.yaml has them whole):\n" + summarize_config(cfg))
        self.logger.info(self.channel_layout())
        if not tr.save and not self.log_dir:
            self.logger.info("note: no --save and no --log-dir: nothing will be written (no checkpoint, "
                             "metrics.jsonl, TensorBoard events or config.yaml); only these lines are output")
        if not tr.skip_train:
            self.logger.info(f"MFU against {self.peak.tflops:g} TFLOP/s per device ({self.peak.source})" if self.peak
                             else "MFU not reported: no peak TFLOP/s known for this device (give --peak-tflops)")
        if self.rank == 0 and self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            tmp = os.path.join(self.log_dir, ".config.yaml.tmp")
            with open(tmp, "w") as fh:
                fh.write(dump_config(cfg))
            os.replace(tmp, os.path.join(self.log_dir, "config.yaml"))
        summary: Dict[str, Any] = {"iteration": state.iteration}
        if tr.skip_train:
            summary["eval"] = self.evaluate(state.iteration)
            self.task.on_train_end(self._unwrapped(), self.log_dir)
            self.logger.close()
            return summary

        if state.data_state is not None:
            for stream in streams:
                stream.load_state_dict(state.data_state)
        stream = streams[0]  # its position is the data state saved with checkpoints
        self.stop.install()
        iteration = state.iteration
        flops = self.task.flops_per_sample()
        window_start, window_steps, window_losses = time.time(), 0, []
        consecutive_bad, last_eval = 0, None
        try:
            while iteration < tr.train_iters:
                for m in self.models:
                    m.zero_grad_buffer()
                self.optimizer.zero_grad()
                records = self._run_microbatches(streams, False, self.num_microbatches, iteration + 1)
                step_inputs = self.task.take_step_inputs()
                losses = self._reduce_losses(records)
                loss = losses.get("loss", float("nan"))
                finite = math.isfinite(loss) and self._grads_finite()
                if finite:
                    ok, grad_norm, _ = self.optimizer.step()
                    finite = bool(ok) and (grad_norm is None or math.isfinite(grad_norm))
                if not finite:
                    consecutive_bad += 1
                    iteration += 1
                    inputs = self._nonfinite_step_inputs(step_inputs)
                    held = f"; its micro-batches held {_first_few(inputs)}" if inputs else ""
                    self.logger.record("skip", iteration, loss=loss, reason="non-finite loss or gradient",
                                       consecutive=consecutive_bad, inputs=inputs)
                    self.logger.info(f"step {iteration}: non-finite loss/gradient, update skipped "
                                     f"({consecutive_bad} in a row){held}")
                    if consecutive_bad >= tr.max_consecutive_nonfinite:
                        raise TrainingStopped(
                            f"{consecutive_bad} consecutive non-finite steps (limit "
                            f"training.max_consecutive_nonfinite={tr.max_consecutive_nonfinite})"
                            + (f"; the last one's micro-batches held {_first_few(inputs)}" if inputs else "")
                        )
                    continue
                consecutive_bad = 0
                self.scheduler.step(increment=self.global_batch_size)
                iteration += 1
                window_steps += 1
                window_losses.append(loss)
                self.logger.progress(iteration, loss)
                if iteration % tr.log_interval == 0 or iteration == tr.train_iters:
                    elapsed = max(time.time() - window_start, 1e-9)
                    samples_per_s = window_steps * self.global_batch_size / elapsed
                    world = dist.get_world_size()
                    tflops = flops * samples_per_s / world / 1e12 if flops else None
                    step_s = elapsed / window_steps
                    rec = self.logger.record(
                        "train", iteration, loss=sum(window_losses) / len(window_losses),
                        lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                        samples_per_s=samples_per_s, tflops=tflops,
                        peak_mem_bytes=peak_memory_bytes(), train_iters=tr.train_iters,
                        consumed_samples=iteration * self.global_batch_size, iteration_time_ms=1000 * step_s,
                        mfu=tflops / self.peak.tflops if tflops is not None and self.peak else None,
                        peak_tflops=self.peak.tflops if self.peak else None,
                        eta_s=(tr.train_iters - iteration) * step_s,
                        **{k: v for k, v in losses.items() if k != "loss"},
                    )
                    self.logger.info(format_train_line(rec))
                    window_start, window_steps, window_losses = time.time(), 0, []
                if tr.eval_iters and tr.eval_interval and iteration % tr.eval_interval == 0:
                    last_eval = self.evaluate(iteration)
                if tr.save_interval and iteration % tr.save_interval == 0:
                    self._save(iteration, stream)
                fault_injection.maybe_exit_after(iteration, self.rank)
                if self._should_exit():
                    self.logger.info(f"stopping at iteration {iteration} (signal or time limit); saving")
                    self.logger.record("event", iteration, event="exit", reason="signal or time limit")
                    if not (tr.save_interval and iteration % tr.save_interval == 0):
                        self._save(iteration, stream)
                    summary.update(iteration=iteration, stopped=True)
                    return summary
        except TrainingStopped as exc:
            self.logger.info(str(exc) + "; saving the last good state")
            if tr.save:
                self._save(iteration, stream)  # updates were skipped: the weights are the last good ones
            raise
        finally:
            self.stop.restore()
            for s in streams:  # stops their data loader workers (data.num_workers)
                s.close()
        summary["iteration"] = iteration
        if tr.eval_iters and (last_eval is None or last_eval["step"] != iteration):
            last_eval = self.evaluate(iteration)
        summary["eval"] = last_eval
        if tr.save and not (tr.save_interval and iteration % tr.save_interval == 0):
            self._save(iteration, stream)
        self.task.on_train_end(self._unwrapped(), self.log_dir)
        self.logger.close()
        return summary

    def _should_exit(self) -> bool:
        tr = self.cfg.training
        local = self.stop.requested
        if tr.exit_duration_in_mins is not None:
            local = local or (time.time() - self.start_time) / 60.0 >= tr.exit_duration_in_mins
        return _any_rank(local)
