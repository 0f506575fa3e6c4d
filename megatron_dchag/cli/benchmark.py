"""Benchmark the channel-stage strategies side by side: per-rank peak memory and step time.

For each TP size the tool starts ``T`` processes (gloo on CPU, nccl when GPUs are present). In them
it trains every case (strategy x aggregation layer x tree x channel-stage implementation x channel
count, on one model configuration) the way the trainer does, so the memory and time are those of
real training:

* the model is built by :func:`~megatron_dchag.training.builder.build_training_components` from a
  :class:`~megatron_dchag.tasks.benchmark.SyntheticEncoderTask`: the D-CHAG encoder (optionally with a channel-parallel head and an
  MSE loss), wrapped in megatron-core's ``DistributedDataParallel`` (gradients in a contiguous fp32
  ``main_grad`` buffer), with ``get_megatron_optimizer`` (Adam with the training defaults, gradient
  clipping included) and, with ``--bf16``, ``Float16Module`` plus the optimizer's fp32 main
  parameters;
* a step is the trainer's: ``zero_grad_buffer``, ``optimizer.zero_grad``, megatron-core's
  ``forward_backward`` schedule over one micro-batch, ``optimizer.step`` and the LR scheduler;
* every rank is fed one fixed synthetic micro-batch of only its own input channels
  (``input_channel_range``), in fp32 as the data loader delivers it.

Per case it reports

* per-rank peak memory: on CPU torch's ``MemTracker`` (byte-exact) over ``--mem-steps`` steps, split
  into parameters / gradients (the transient ``.grad`` tensors and DDP's ``main_grad`` buffer) /
  optimizer (Adam state, the fp32 main parameters under bf16, and what the optimizer allocates in
  its step) / activations / temporaries / inputs; on GPU the allocator's peak, with activations as
  the remainder;
* the median step time over ``--steps`` timed steps after warm-up (barrier to barrier, i.e. the
  slowest rank), samples/s and TFLOP/s per rank from :mod:`megatron_dchag.flops`.

Timed steps of the cases that share a TP size and channel count are **interleaved** (round robin),
so background load on a shared machine hits all of them alike; the figures that count are ratios
against ``tp_baseline`` measured in the same run.

``--fsdp F ...`` (or ``--layouts TPxFSDP ...``) adds model-sharding layouts: a case at TP ``t`` and
FSDP ``f`` runs on ``t x f`` processes with ``parallel.use_torch_fsdp2`` (megatron-core's
``TorchFullyShardedDataParallel`` in place of DDP, parameters, gradients and Adam state sharded
over the ``f`` data-parallel ranks, each fed its own micro-batch); its label ends in ``-fsdpF`` and
it is compared with ``tp_baseline`` at the same layout.

``--channel-stage-impl auto fused reference`` (any of them) sets ``model.channel_stage_impl`` for
the cases whose tree can run fused (a linear partial-aggregation tree); such a case is run once per
value and its label ends in the value. The other cases have only the reference path and run once.

Outputs (all written atomically): ``--json`` (one record per case plus the run's configuration and
machine), ``--markdown`` (a table with ratios against ``tp_baseline`` at the same TP and channel
count) and ``--plot`` (PNG: memory and throughput vs channels, one line per case).
``--tokenizer-bench`` instead times the grouped tokenizer against a per-channel loop of patch
embeddings in one process (layers only, no training step).
``--channel-stage-bench`` instead runs the ``dchag`` channel stage alone on both paths of a linear
tree, fused and reference, with identical parameters: per case (``--channels`` x ``--trees`` x
``--visible-fractions``) the peak of one forward + backward under MemTracker, the median time of
interleaved forward + backward steps, and the largest relative difference of the outputs and
gradients (a fused path that differs reports a mismatch, not a speed-up). One process at ``--tp 1``
(its default); at ``--tp T`` T ranks, each with its share of the stage as the encoder builds it
(its channel groups and tree, the all-gather of the group tokens, its shard of the final TP
cross-attention; G defaults to T): the peak per rank (max over ranks), each step's time the
slowest rank's.

Examples::

    python tools/benchmark.py --tp 4 --channels 256 512 1024 \\
        --strategies tp_baseline dist_tokenize hierarchical dchag --layers linear cross_attention \\
        --channel-stage-impl auto reference --json docs/bench/main.json --markdown docs/bench/main.md
    python tools/benchmark.py --tokenizer-bench --channels 500 --json docs/bench/tokenizer.json
    python tools/benchmark.py --channel-stage-bench --channels 1024 512 --trees '[]' '[64,4]' \\
        --visible-fractions 1.0 0.25 --steps 7 --json docs/bench/fused_channel_stage.json
    python tools/benchmark.py --channel-stage-bench --tp 4 --channels 1024 --trees '[]' \\
        --visible-fractions 1.0 --steps 7 --warmup 1 --json docs/bench/fused_channel_stage_tp4.json

(installed as the console script ``dchag-benchmark`` with the same flags). Cases that cannot run
(e.g. groups not divisible by TP, a tree chunk larger than a group) are reported with the reason,
not run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_dchag.config.sections import CHANNEL_STAGE_IMPLS
from megatron_dchag.launch_env import find_free_port, local_rank_start_method, overriding_environ

STRATEGY_ORDER = ("tp_baseline", "dist_tokenize", "hierarchical", "dchag")
PARTIAL = ("hierarchical", "dchag")
# 2: the trainer's DDP + megatron optimizer (framework "megatron"), fp32 inputs under bf16, the
# channel-stage implementation per case (channel_stage_impl, channel_stage).
SCHEMA_VERSION = 2
# What the step runs, for the memory model (megatron_dchag.memory_model.MemoryConfig.framework).
FRAMEWORK = "megatron"
# --tp when not given: the training-step cases; --channel-stage-bench runs at TP=1 by default.
DEFAULT_TP = 4


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_layout(text: str) -> Tuple[int, int]:
    """``"2x2"`` -> (TP 2, FSDP 2)."""
    try:
        tp, fsdp = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layouts {text!r}: expected TPxFSDP, e.g. 2x2") from None
    if tp < 1 or fsdp < 1:
        raise argparse.ArgumentTypeError(f"--layouts {text!r}: TP and FSDP must be >= 1")
    return tp, fsdp


def layouts_of(args: argparse.Namespace) -> List[Tuple[int, int]]:
    """The (TP, FSDP) layouts to run, in order: ``--layouts``, else every ``--tp`` x ``--fsdp``."""
    layouts = getattr(args, "layouts", None)
    tps = args.tp or [DEFAULT_TP]
    return list(layouts) if layouts else [(tp, fsdp) for tp in tps for fsdp in getattr(args, "fsdp", [1])]


def parse_tree(text: str) -> List[int]:
    """``"[]"``, ``"[64]"``, ``"[64,4]"``, ``"64,4"`` or ``"64x4"`` -> list of chunk sizes."""
    t = text.strip().strip("[]()").replace("x", ",").replace(" ", "")
    if not t:
        return []
    try:
        return [int(v) for v in t.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tree '{text}' must look like [] or [64] or [64,4]") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("cases")
    g.add_argument("--strategies", nargs="+", default=list(STRATEGY_ORDER), choices=STRATEGY_ORDER)
    g.add_argument("--layers", nargs="+", default=["linear"], choices=["linear", "cross_attention"],
                   help="partial-aggregation layer kinds (dchag, hierarchical)")
    g.add_argument("--trees", nargs="+", type=parse_tree, default=[[]], help="trees, e.g. [] [64] [64,4]")
    g.add_argument("--channel-stage-impl", nargs="+", default=["auto"], choices=CHANNEL_STAGE_IMPLS,
                   dest="channel_stage_impls",
                   help="model.channel_stage_impl values for the cases with a linear tree (one case each)")
    g.add_argument("--tp", nargs="+", type=int, default=None,
                   help="tensor-parallel sizes (processes; default 4, with --channel-stage-bench one size, default 1)")
    g.add_argument("--fsdp", nargs="+", type=int, default=[1],
                   help="FSDP degrees: a case at TP t and FSDP f runs on t x f processes, its parameters, "
                        "gradients and optimizer state sharded over the f data-parallel ranks "
                        "(parallel.use_torch_fsdp2); 1: megatron DDP over one data-parallel rank")
    g.add_argument("--layouts", nargs="+", type=parse_layout, default=None, metavar="TPxFSDP",
                   help="(TP, FSDP) pairs in place of every --tp x --fsdp combination, e.g. 4x1 2x2 1x4")
    g.add_argument("--channels", nargs="+", type=int, default=[256, 512, 1024])
    g = p.add_argument_group("model (defaults: the benchmark configuration of docs/performance.md)")
    g.add_argument("--image-size", nargs=2, type=int, default=[64, 128], metavar=("H", "W"))
    g.add_argument("--patch-size", type=int, default=8)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--channel-groups", type=int, default=None,
                   help="G (default: the TP size, also with --channel-stage-bench)")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--with-head", action="store_true", help="add a channel-parallel head and an MSE loss")
    g = p.add_argument_group("fast paths")
    g.add_argument("--bf16", action="store_true", help="bf16 model (Float16Module) with fp32 main parameters")
    g.add_argument("--recompute-channel-stage", action="store_true", help="activation recompute of the channel stage")
    g.add_argument("--final-aggregation", choices=["folded", "textbook"], default="folded",
                   help="textbook: explicit keys/values of every token in the final cross-attention")
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per case before timing")
    g.add_argument("--mem-steps", type=int, default=2, help="steps under MemTracker (>= 2 to include a full step cycle)")
    g.add_argument("--no-interleave", action="store_true", help="time each case on its own instead of round robin")
    g.add_argument("--threads", type=int, default=None,
                   help="threads per rank (default: cores // TP, at least 1; --channel-stage-bench at TP=1: 1)")
    g.add_argument("--time-budget", type=float, default=3600.0,
                   help="seconds; cases not started when it runs out are reported as skipped")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g = p.add_argument_group("outputs")
    g.add_argument("--json", dest="json_path", default=None)
    g.add_argument("--markdown", default=None, help="markdown table (default: printed only)")
    g.add_argument("--plot", default=None, help="PNG plot")
    g.add_argument("--title", default=None)
    g.add_argument("--from-json", default=None, metavar="FILE",
                   help="render --markdown/--plot from an earlier --json output instead of running")
    g = p.add_argument_group("tokenizer benchmark")
    g.add_argument("--tokenizer-bench", action="store_true",
                   help="one process: grouped tokenizer vs a per-channel loop of patch embeddings")
    g.add_argument("--tokenizer-repeats", type=int, default=5)
    g.add_argument("--tokenizer-mask-ratio", type=float, default=None,
                   help="also time MAE-style tokenization of the visible patches only")
    g = p.add_argument_group("channel-stage benchmark (also: --tp, --channels, --trees, --channel-groups, --steps, "
                                 "--warmup, --threads, --seed and the model sizes)")
    g.add_argument("--channel-stage-bench", action="store_true",
                   help="the dchag channel stage fused vs reference (linear trees), forward + backward of the "
                        "stage alone: one process at --tp 1 (the default), else TP gloo/nccl ranks, each with "
                        "its share of the stage; G defaults to the TP size")
    g.add_argument("--visible-fractions", nargs="+", type=float, default=[1.0],
                   help="fractions of patch positions given to the stage (1.0: all; < 1: a masked MAE input)")
    return p


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    strategy: str
    layer: Optional[str]
    tree: Optional[List[int]]
    tp: int
    channels: int
    channel_stage_impl: str = "auto"
    fsdp: int = 1  # data-parallel ranks the model is sharded over (1: DDP, nothing sharded)
    status: str = "pending"  # ok | skipped | failed
    reason: Optional[str] = None

    @property
    def fusable(self) -> bool:
        """Whether the case has a linear partial-aggregation tree (a fused and a reference path)."""
        return self.strategy in PARTIAL and self.layer == "linear"

    @property
    def label(self) -> str:
        if self.strategy in PARTIAL:
            kind = "L" if self.layer == "linear" else "C"
            label = f"{self.strategy}-{kind}-tree{json.dumps(self.tree).replace(' ', '')}"
            label = f"{label}-{self.channel_stage_impl}" if self.fusable else label
        else:
            label = self.strategy
        return f"{label}-fsdp{self.fsdp}" if self.fsdp > 1 else label

    @property
    def world_size(self) -> int:
        return self.tp * self.fsdp


def model_config_for(args: argparse.Namespace, case: Case):
    from megatron_dchag.config import ModelConfig

    kw = dict(
        num_channels=case.channels,
        image_size=tuple(args.image_size),
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        channel_groups=args.channel_groups,
        strategy=case.strategy,
        channel_stage_impl=case.channel_stage_impl,
    )
    if case.strategy in PARTIAL:
        kw.update(aggregation_layer=case.layer, aggregation_tree=list(case.tree))
    return ModelConfig(**kw)


def experiment_config_for(args: argparse.Namespace, case: Case):
    """The resolved config a training run of this case would have (TP = T, PP = 1, DP = the FSDP
    degree, FSDP when it is above 1)."""
    from megatron_dchag.config import ExperimentConfig, ParallelConfig, TrainingConfig, resolve_config

    training = TrainingConfig(
        micro_batch_size=args.micro_batch_size, bf16=bool(args.bf16), seed=args.seed,
        recompute_granularity="channel_stage" if args.recompute_channel_stage else None,
    )
    cfg = ExperimentConfig(model=model_config_for(args, case),
                           parallel=ParallelConfig(tensor_model_parallel_size=case.tp, use_torch_fsdp2=case.fsdp > 1),
                           training=training)
    return resolve_config(cfg)


def enumerate_cases(args: argparse.Namespace) -> List[Case]:
    from megatron_dchag.config import ConfigError, validate_model_config

    cases: List[Case] = []
    strategies = [s for s in STRATEGY_ORDER if s in args.strategies]
    for tp, fsdp in layouts_of(args):
        for channels in args.channels:
            for strategy in strategies:
                if strategy in PARTIAL:
                    variants = [(layer, list(tree)) for layer in args.layers for tree in args.trees]
                else:
                    variants = [(None, None)]
                for layer, tree in variants:
                    fusable = strategy in PARTIAL and layer == "linear"
                    for impl in (args.channel_stage_impls if fusable else ["auto"]):
                        case = Case(strategy, layer, tree, tp, channels, channel_stage_impl=impl, fsdp=fsdp)
                        try:
                            validate_model_config(model_config_for(args, case), tp)
                        except (ConfigError, ValueError) as exc:
                            case.status, case.reason = "skipped", str(exc)
                        cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------------
# Worker side (runs in each rank)
# ------------------------------------------------------------------------------------------------


def _repeat(value) -> Iterator:
    while True:
        yield value


class Runner:
    """One case on this rank: the task, what the builder made of it, the synthetic micro-batch and
    the trainer's step."""

    def __init__(self, args, case: Case):
        import torch

        from megatron_dchag.device import compute_device
        from megatron_dchag.tasks.benchmark import SyntheticEncoderTask
        from megatron_dchag.training.builder import build_training_components, unwrap_model

        self.args, self.case = args, case
        self.cfg = experiment_config_for(args, case)
        self.task = SyntheticEncoderTask(self.cfg, with_head=args.with_head, final_aggregation=args.final_aggregation)
        torch.manual_seed(args.seed)
        self.components = build_training_components(self.cfg, self.task)
        self.models = self.components.models
        self.model = unwrap_model(self.models[0])
        lo, hi = self.model.input_channel_range
        gen = torch.Generator().manual_seed(args.seed + lo)
        h, w = args.image_size
        # fp32, as the data loader delivers a batch (Float16Module casts it under bf16)
        self.images = torch.randn(args.micro_batch_size, hi - lo, h, w, generator=gen).to(compute_device())
        self.data = _repeat(self.images)
        self.seq_length = (h // args.patch_size) * (w // args.patch_size)

    def step(self) -> float:
        """The trainer's step on one micro-batch."""
        comp = self.components
        for m in self.models:
            m.zero_grad_buffer()
        comp.optimizer.zero_grad()
        records = comp.forward_backward(
            forward_step_func=self.task.forward_step, data_iterator=self.data, model=self.models[0],
            num_microbatches=1, seq_length=self.seq_length, micro_batch_size=self.args.micro_batch_size,
            forward_only=False,
        )
        ok, _, _ = comp.optimizer.step()
        if ok:
            comp.scheduler.step(increment=self.args.micro_batch_size)
        return float(records[0]["loss"]) if records else float("nan")

    # -- what the run holds besides activations, for the memory split ----------------------------
    def parameters(self) -> List[Any]:
        return [p for m in self.models for p in m.parameters()]

    def grad_buffers(self) -> List[Any]:
        """DDP's contiguous gradient buffers (each parameter's ``main_grad`` is a view into one);
        none under FSDP (its gradients are the parameters' sharded ``.grad``)."""
        return [buf.grad_data for m in self.models if hasattr(m, "expert_parallel_buffers")
                for buf in (m.buffers + m.expert_parallel_buffers)]

    def inner_optimizers(self) -> List[Any]:
        """The torch optimizers inside the megatron optimizer (one per chained optimizer)."""
        return [opt.optimizer for opt in getattr(self.components.optimizer, "chained_optimizers",
                                                 [self.components.optimizer])]

    def main_params(self) -> List[Any]:
        """The optimizer's own parameter copies (fp32 main parameters of bf16 weights): every tensor
        it steps that is not a model parameter."""
        model_storages = {_local(p).untyped_storage().data_ptr() for p in self.parameters()}
        return [_local(p) for opt in self.inner_optimizers() for group in opt.param_groups for p in group["params"]
                if _local(p).untyped_storage().data_ptr() not in model_storages]

    def adam_impl(self) -> str:
        """``torch`` when megatron-core fell back to torch's AdamW (no apex / Transformer Engine),
        else ``fused``; the memory model's ``adam_impl``."""
        inner = self.inner_optimizers()[0]
        return "torch" if type(inner).__module__.startswith("torch.optim") else "fused"

    def optimizer_state_bytes(self) -> int:
        return sum(_local(v).numel() * v.element_size() for opt in self.inner_optimizers() for st in opt.state.values()
                   for v in st.values() if hasattr(v, "numel"))

    def release(self) -> None:
        for name in ("components", "models", "model", "task", "images", "data"):
            setattr(self, name, None)
        gc.collect()


def _local(t):
    """This rank's part of a tensor: the local shard of an FSDP ``DTensor``, else the tensor."""
    return getattr(t, "_local_tensor", t)


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class _ModuleBufferList(list):
    """megatron-core's ``DistributedDataParallel`` keeps its gradient buffers in an attribute named
    ``buffers``, which hides ``nn.Module.buffers()``; MemTracker calls that method on every module it
    sees. Under MemTracker the attribute is this list: the same buffers for DDP, and callable as the
    module method for MemTracker."""

    def __init__(self, module, items):
        super().__init__(items)
        self._module = module

    def __call__(self, recurse: bool = True):
        import torch

        return torch.nn.Module.buffers(self._module, recurse)


@contextlib.contextmanager
def _callable_ddp_buffers(models):
    models = [m for m in models if not callable(m.buffers)]  # DDP only (FSDP keeps the module method)
    saved = [m.buffers for m in models]
    for m in models:
        m.buffers = _ModuleBufferList(m, m.buffers)
    try:
        yield
    finally:
        for m, b in zip(models, saved):
            m.buffers = b


def measure_memory_cpu(runner: Runner, steps: int) -> Dict[str, Any]:
    """MemTracker over ``steps`` steps. The run's persistent tensors made before it (inputs, DDP's
    gradient buffers, the optimizer's main parameters) are tracked as "Other" and attributed here;
    a buffer MemTracker itself saw as a gradient is counted there already."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    buffers, mains = runner.grad_buffers(), runner.main_params()
    with _callable_ddp_buffers(runner.models):
        tracker.track_external(*runner.models, *runner.inner_optimizers(), runner.images, *buffers, *mains)
        with tracker:
            for _ in range(steps):
                runner.step()
                tracker.reset_mod_stats()
    snap = tracker.get_tracker_snapshot("peak")
    dev_snap = next(iter(snap.values())) if snap else {}
    by = {(k if isinstance(k, str) else k.value): int(v) for k, v in dev_snap.items()}
    input_bytes = _nbytes([runner.images])
    other = by.get("Other", 0)
    inputs = min(input_bytes, other)
    main_bytes = min(_nbytes(mains), other - inputs)
    breakdown = {
        "parameters": by.get("Parameter", 0) + by.get("Buffer", 0),
        "gradients": by.get("Gradient", 0) + (other - inputs - main_bytes),
        "optimizer": by.get("Optstate", 0) + main_bytes,
        "activations": by.get("Activation", 0),
        "temp": by.get("Temp", 0),
        "inputs": inputs,
    }
    return {"peak_mem_bytes": int(by.get("Total", 0)), "mem_breakdown": breakdown, "input_bytes": input_bytes,
            "grad_buffer_bytes": _nbytes(buffers), "main_param_bytes": _nbytes(mains), "mem_method": "MemTracker"}


def measure_memory_gpu(runner: Runner, steps: int) -> Dict[str, Any]:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        runner.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    params = _nbytes(runner.parameters())
    grads = _nbytes(runner.grad_buffers())
    mains = _nbytes(runner.main_params())
    opt_bytes = runner.optimizer_state_bytes() + mains
    inputs = _nbytes([runner.images])
    rest = max(0, peak - params - grads - opt_bytes - inputs)
    return {"peak_mem_bytes": int(peak), "mem_breakdown": {"parameters": params, "gradients": grads, "optimizer": opt_bytes,
            "activations": rest, "temp": 0, "inputs": inputs}, "grad_buffer_bytes": grads, "main_param_bytes": mains,
            "mem_method": "cuda.max_memory_allocated (activations = peak - parameters - gradient buffers - optimizer "
                          "- inputs)", "allocated_before": int(base)}


def _flops_per_step(args, case: Case) -> float:
    from megatron_dchag.flops import flops_breakdown, training_flops

    cfg = model_config_for(args, case)
    parts = flops_breakdown(cfg, args.micro_batch_size, tensor_model_parallel_size=case.tp, with_head=args.with_head)
    return training_flops(parts["total"])


def _timed_step(runner: Runner, device) -> float:
    import torch.distributed as dist

    dist.barrier()
    _sync(device)
    t0 = time.perf_counter()
    runner.step()
    _sync(device)
    dist.barrier()
    return time.perf_counter() - t0


def run_group(args, cases: List[Case], device, deadline: float) -> List[Dict[str, Any]]:
    """Run the cases of one (TP, channels) group on this rank; returns this rank's records."""
    import torch
    import torch.distributed as dist

    out: Dict[int, Dict[str, Any]] = {}
    runners: Dict[int, Runner] = {}
    timed: Dict[int, List[float]] = {}

    def agree(flag: bool) -> bool:  # every rank takes the same decision
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    for i, case in enumerate(cases):
        if not agree(time.time() < deadline):
            out[i] = {"status": "skipped", "reason": "time budget exhausted"}
            continue
        runner = None
        try:
            runner = Runner(args, case)
            mem = measure_memory_gpu(runner, args.mem_steps) if device.type == "cuda" else \
                measure_memory_cpu(runner, args.mem_steps)
            mem["params_per_rank"] = sum(_local(p).numel() for p in runner.parameters())
            mem["input_channels"] = list(runner.model.input_channel_range)
            inner = runner.inner_optimizers()[0]
            mem["optimizer_class"] = f"{type(inner).__module__}.{type(inner).__qualname__}"
            mem["adam_impl"] = runner.adam_impl()
            for _ in range(args.warmup):
                runner.step()
            out[i] = {"status": "ok", **mem}
            timed[i] = []
            if args.no_interleave:
                timed[i] = [_timed_step(runner, device) for _ in range(args.steps)]
                runner.release()
            else:
                runners[i] = runner
        except Exception as exc:  # noqa: BLE001 - reported per case
            out[i] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=6)}
            if runner is not None:
                runner.release()
            runners.pop(i, None)
    if not args.no_interleave:
        live = sorted(runners)
        for _ in range(args.steps):
            if not agree(time.time() < deadline + 600):  # finish rounds unless hopelessly late
                break
            for i in live:
                timed[i].append(_timed_step(runners[i], device))
        for r in runners.values():
            r.release()
    records = []
    for i, case in enumerate(cases):
        rec = dict(out[i])
        if rec.get("status") == "ok":
            times = timed.get(i) or []
            rec["step_times_s"] = times
            rec["step_time_s"] = statistics.median(times) if times else None
            rec["flops_per_step"] = _flops_per_step(args, case)
        records.append(rec)
    return records


def worker(rank: int, tp: int, port: int, args_dict: Dict[str, Any], case_dicts: List[Dict[str, Any]],
           result_path: str, deadline: float, use_cuda: bool, world: Optional[int] = None) -> None:
    world = world or tp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import io
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    from megatron_dchag.device import compute_device
    from megatron_dchag.distributed import destroy_distributed, initialize_distributed

    with contextlib.redirect_stdout(io.StringIO()):
        initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, seed=args.seed)
    device = compute_device()
    cases = [Case(**c) for c in case_dicts]
    groups: Dict[int, List[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.channels, []).append(i)
    results: List[Optional[Dict[str, Any]]] = [None] * len(cases)
    for channels, idx in groups.items():
        recs = run_group(args, [cases[i] for i in idx], device, deadline)
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, recs)
        for j, i in enumerate(idx):
            per_rank = [everyone[r][j] for r in range(world)]
            results[i] = merge_rank_records(per_rank)
        if rank == 0:
            fsdp = f" FSDP={world // tp}" if world > tp else ""
            print(f"[benchmark] TP={tp}{fsdp} channels={channels}: " + ", ".join(
                f"{cases[i].label}={_fmt_status(results[i])}" for i in idx), flush=True)
    if rank == 0:
        _atomic_write(result_path, json.dumps(results))
    destroy_distributed()


def _fmt_status(rec: Dict[str, Any]) -> str:
    if rec.get("status") != "ok":
        return rec.get("status", "?")
    t = rec.get("step_time_s")
    return f"{rec['peak_mem_bytes'] / 2**20:.0f}MiB/{t:.3f}s" if t else f"{rec['peak_mem_bytes'] / 2**20:.0f}MiB"


def merge_rank_records(per_rank: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One record from every rank's: peak = max over ranks (breakdown of that rank)."""
    failed = [r for r in per_rank if r.get("status") != "ok"]
    if failed:
        return dict(failed[0])
    top = max(range(len(per_rank)), key=lambda r: per_rank[r]["peak_mem_bytes"])
    rec = dict(per_rank[top])
    rec["peak_mem_bytes_per_rank"] = [r["peak_mem_bytes"] for r in per_rank]
    rec["peak_rank"] = top
    rec["params_per_rank"] = [r["params_per_rank"] for r in per_rank]
    rec["input_channels_per_rank"] = [r["input_channels"] for r in per_rank]
    rec.pop("input_channels", None)
    # Step times are barrier to barrier: rank 0's list is the job's.
    rec["step_times_s"] = per_rank[0].get("step_times_s")
    rec["step_time_s"] = per_rank[0].get("step_time_s")
    return rec


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------


def _atomic_write(path: str, data, binary: bool = False) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def machine_info(use_cuda: bool) -> Dict[str, Any]:
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": "nccl" if use_cuda else "gloo",
    }
    try:
        import megatron.core

        info["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if use_cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def run_cases(args, cases: List[Case], use_cuda: bool) -> List[Dict[str, Any]]:
    import torch.multiprocessing as mp

    deadline = time.time() + args.time_budget
    records: List[Dict[str, Any]] = []
    args_dict = {k: v for k, v in vars(args).items()}
    for tp, fsdp in [layout for layout in layouts_of(args) if any((c.tp, c.fsdp) == layout for c in cases)]:
        world = tp * fsdp
        todo = [c for c in cases if (c.tp, c.fsdp) == (tp, fsdp) and c.status == "pending"]
        results: List[Optional[Dict[str, Any]]] = [None] * len(todo)
        if todo and use_cuda and world > _gpu_count():
            results = [{"status": "skipped", "reason": f"TP={tp} x FSDP={fsdp} needs {world} GPUs, {_gpu_count()} present"}] * len(todo)
        elif todo and time.time() >= deadline:
            results = [{"status": "skipped", "reason": "time budget exhausted"}] * len(todo)
        elif todo:
            threads = args.threads or max(1, (os.cpu_count() or 1) // world)
            args_dict["threads"] = threads
            with tempfile.TemporaryDirectory(prefix="dchag_bench_") as tmp:
                result_path = os.path.join(tmp, "result.json")
                try:
                    with _rank_environ(threads, use_cuda):
                        mp.start_processes(worker, args=(tp, find_free_port(), args_dict,
                                                         [dataclasses.asdict(c) for c in todo], result_path, deadline,
                                                         use_cuda, world),
                                           nprocs=world, join=True, start_method=local_rank_start_method(_RANK_PRELOAD))
                    with open(result_path) as fh:
                        results = json.load(fh)
                except Exception as exc:  # noqa: BLE001 - a crashed rank fails its TP size, not the run
                    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    results = [{"status": "failed", "reason": f"TP={tp} x FSDP={fsdp} processes failed: {msg}"}] * len(todo)
        for c, r in zip(todo, results):
            c.status, c.reason = r.get("status", "failed"), r.get("reason")
        by_case = {id(c): r for c, r in zip(todo, results)}
        for c in cases:
            if (c.tp, c.fsdp) != (tp, fsdp):
                continue
            records.append(make_record(args, c, by_case.get(id(c), {})))
    return records


# what a rank's fork server imports once
_RANK_PRELOAD = ("torch", "megatron_dchag.cli.benchmark", "megatron_dchag.distributed", "megatron_dchag.tasks.benchmark",
                 "megatron_dchag.training.builder", "torch.distributed._tools.mem_tracker")


def _rank_environ(threads: int, use_cuda: bool):
    """What the rank processes inherit: ``threads`` OpenMP threads each, and no GPU under
    ``--device cpu`` on a machine with GPUs."""
    return overriding_environ(OMP_NUM_THREADS=str(threads), **({} if use_cuda else {"CUDA_VISIBLE_DEVICES": ""}))


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def make_record(args, case: Case, measured: Dict[str, Any]) -> Dict[str, Any]:
    from megatron_dchag.config import resolve_model

    cfg = model_config_for(args, case)
    rec: Dict[str, Any] = {
        "strategy": case.strategy,
        "layer": case.layer,
        "tree": case.tree,
        "channel_stage_impl": case.channel_stage_impl,
        "channel_stage": "fused" if cfg.fuses_channel_stage else "reference",
        "label": case.label,
        "tp": case.tp,
        "fsdp": case.fsdp,
        "channels": case.channels,
        "channel_groups": resolve_model(cfg, case.tp).channel_groups,
        "micro_batch_size": args.micro_batch_size,
        "bf16": bool(args.bf16),
        "recompute_channel_stage": bool(args.recompute_channel_stage),
        "with_head": bool(args.with_head),
        "final_aggregation": args.final_aggregation,
        "framework": FRAMEWORK,
        "status": case.status if not measured else measured.get("status", case.status),
        "reason": case.reason if not measured else measured.get("reason", case.reason),
        "peak_mem_bytes": None,
        "peak_mem_bytes_per_rank": None,
        "step_time_s": None,
        "step_times_s": None,
        "flops_per_step": None,
        "samples_per_s": None,
        "tflops": None,
        "mem_breakdown": None,
    }
    if measured.get("status") == "ok":
        rec.update({k: v for k, v in measured.items() if k not in ("status", "reason")})
        t = rec.get("step_time_s")
        if t:
            rec["samples_per_s"] = args.micro_batch_size * case.fsdp / t  # one micro-batch per DP rank
            rec["tflops"] = rec["flops_per_step"] / t / case.tp / 1e12
    elif measured.get("traceback"):
        rec["traceback"] = measured["traceback"]
    return rec


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _tree_str(tree) -> str:
    return "-" if tree is None else json.dumps(tree).replace(" ", "")


def _layout_str(rec: Dict[str, Any]) -> str:
    """The TP size, with the FSDP degree where the case shards over data-parallel ranks."""
    return f"{rec['tp']} x FSDP{rec['fsdp']}" if rec.get("fsdp", 1) > 1 else str(rec["tp"])


def baseline_for(records: List[Dict[str, Any]], rec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    for r in records:
        if r["strategy"] == "tp_baseline" and r["tp"] == rec["tp"] and r["channels"] == rec["channels"] \
                and r.get("fsdp", 1) == rec.get("fsdp", 1) and r["status"] == "ok":
            return r
    return None


def _training_note(cfg: Dict[str, Any], fsdp_layouts: bool = False) -> str:
    if cfg.get("framework") == FRAMEWORK:
        fsdp = "; TorchFullyShardedDataParallel (torch FSDP2) in its place at FSDP > 1" if fsdp_layouts else ""
        return ("Training step: the trainer's (megatron-core DDP with an fp32 main-grad buffer" + fsdp
                + ", get_megatron_optimizer Adam with clipping"
                + (", Float16Module + fp32 main parameters" if cfg["bf16"] else "") + ").")
    return "Optimizer: torch AdamW."  # schema 1 records


def markdown_table(records: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    cfg = meta["config"]
    machine = meta["machine"]
    load = machine.get("load_average_start")
    lines = [
        f"# {meta.get('title') or 'Channel-stage benchmark'}",
        "",
        f"Model: image {cfg['image_size'][0]}x{cfg['image_size'][1]}, patch {cfg['patch_size']}, hidden "
        f"{cfg['hidden_size']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads, micro-batch "
        f"{cfg['micro_batch_size']}, {'bf16 (fp32 main parameters)' if cfg['bf16'] else 'fp32'}"
        f"{', channel-stage recompute' if cfg['recompute_channel_stage'] else ''}"
        f"{', with head' if cfg['with_head'] else ''}, final aggregation {cfg['final_aggregation']}, "
        f"G = {cfg['channel_groups'] or 'T'}. {_training_note(cfg, any(r.get('fsdp', 1) > 1 for r in records))}",
        f"Machine: {machine.get('cpu_model', machine.get('processor'))}, "
        f"{machine['cpu_count']} cores, backend {machine['backend']}"
        f"{f', load average {load[0]:.2f} at the start' if load else ''}; "
        f"{cfg['threads_note']}. Memory: {meta['memory_method']}. Step time: median of {cfg['steps']} steps "
        f"({'interleaved round robin' if not cfg['no_interleave'] else 'per case'}) after "
        f"{cfg['mem_steps']} tracked + {cfg['warmup']} warm-up steps.",
        "",
        "| TP | C | strategy | layer | tree | channel stage | peak/rank MiB | mem vs TP | params | grads | optim | "
        "act+temp | inputs | step s | speed-up vs TP | samples/s | TFLOP/s/rank |",
        "|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    for r in records:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        base = baseline_for(records, r)
        mem_ratio = f"{r['peak_mem_bytes'] / base['peak_mem_bytes']:.1%}" if base else "-"
        speed = (f"{base['step_time_s'] / r['step_time_s']:.2f}x" if base and base.get("step_time_s")
                 and r.get("step_time_s") else "-")
        bd = r.get("mem_breakdown") or {}
        stage = r.get("channel_stage") or "-"
        if r.get("channel_stage_impl") == "auto" and r.get("strategy") in PARTIAL and r.get("layer") == "linear":
            stage = f"{stage} (auto)"
        lines.append(
            f"| {_layout_str(r)} | {r['channels']} | {r['strategy']} | {r['layer'] or '-'} | {_tree_str(r['tree'])} | "
            f"{stage} | {_mib(r['peak_mem_bytes'])} | {mem_ratio} | {_mib(bd.get('parameters'))} | "
            f"{_mib(bd.get('gradients'))} | {_mib(bd.get('optimizer'))} | "
            f"{_mib((bd.get('activations') or 0) + (bd.get('temp') or 0))} | {_mib(bd.get('inputs'))} | "
            f"{'-' if r.get('step_time_s') is None else format(r['step_time_s'], '.3f')} | {speed} | "
            f"{'-' if r.get('samples_per_s') is None else format(r['samples_per_s'], '.2f')} | "
            f"{'-' if r.get('tflops') is None else format(r['tflops'], '.4f')} |"
        )
    if skipped:
        lines += ["", "Cases not run:", ""]
        for r in skipped:
            lines.append(f"- TP={_layout_str(r)} C={r['channels']} {r['label']}: {r['status']} — {r.get('reason')}")
    lines.append("")
    return "\n".join(lines)


def plot(records: List[Dict[str, Any]], path: str, title: Optional[str]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    tps = sorted({r["tp"] for r in ok})
    fig, axes = plt.subplots(max(1, len(tps)), 2, figsize=(12, 4.2 * max(1, len(tps))), squeeze=False)
    for row, tp in enumerate(tps):
        labels = []
        for r in ok:
            if r["tp"] == tp and r["label"] not in labels:
                labels.append(r["label"])
        for label in labels:
            pts = sorted(((r["channels"], r) for r in ok if r["tp"] == tp and r["label"] == label), key=lambda x: x[0])
            xs = [c for c, _ in pts]
            style = dict(marker="o", linewidth=2 if label == "tp_baseline" else 1.4,
                         linestyle="--" if label == "tp_baseline" else "-")
            axes[row][0].plot(xs, [r["peak_mem_bytes"] / 2**20 for _, r in pts], label=label, **style)
            ys = [r["samples_per_s"] for _, r in pts]
            if any(y is not None for y in ys):
                axes[row][1].plot(xs, [y if y is not None else float("nan") for y in ys], label=label, **style)
        axes[row][0].set_title(f"peak memory per rank, TP={tp}")
        axes[row][0].set_ylabel("MiB")
        axes[row][1].set_title(f"throughput, TP={tp}")
        axes[row][1].set_ylabel("samples/s")
        for ax in axes[row]:
            ax.set_xlabel("channels")
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        axes[row][0].legend(fontsize=8)
        axes[row][1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue(), binary=True)


# ------------------------------------------------------------------------------------------------
# Tokenizer benchmark
# ------------------------------------------------------------------------------------------------


def tokenizer_bench(args, command: str) -> Dict[str, Any]:
    """Grouped tokenizer (one batched matmul over channels) vs a per-channel loop of ``Conv2d``
    patch embeddings (the ClimaX/ORBIT style: ``stack([embed[i](x[:, i:i+1]) for i ...])``), one
    process. Both produce the same ``[C, L, B, D]`` tokens (checked) and receive the same upstream
    gradient; times are medians of ``--tokenizer-repeats`` runs of the forward alone and of
    forward + backward (weight and bias gradients). With ``--tokenizer-mask-ratio`` a third pair is
    timed: the grouped tokenizer given the visible patch index (only visible patches tokenized, as
    the MAE does) vs the loop tokenizing every patch and then selecting the visible ones; this
    includes the saving of masking *before* tokenization, not only batching, and is reported
    separately."""
    import torch
    from torch import nn

    from megatron_dchag.layers.channel_plan import ChannelGroupPlan
    from megatron_dchag.layers.tokenizer import GroupedPatchTokenizer, select_patches

    torch.set_num_threads(args.threads or 1)
    results = []
    h, w = args.image_size
    p, d, b = args.patch_size, args.hidden_size, args.micro_batch_size
    n_patches = (h // p) * (w // p)

    def median_time(fn, modules, repeats):
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            for m in modules:
                m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), ts

    for c in args.channels:
        grouped = GroupedPatchTokenizer(ChannelGroupPlan(c, 1), sharded=False, patch_size=p, hidden_size=d, seed=args.seed)
        loop = nn.ModuleList(nn.Conv2d(1, d, p, stride=p) for _ in range(c))
        with torch.no_grad():
            for ch, conv in enumerate(loop):
                conv.weight.copy_(grouped.weight[ch].unsqueeze(1))
                conv.bias.copy_(grouped.bias[ch])
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.randn(b, c, h, w, generator=gen)
        grad = torch.randn(c, n_patches, b, d, generator=gen)

        def loop_forward():
            return torch.stack([conv(images[:, i:i + 1]).flatten(2).permute(2, 0, 1) for i, conv in enumerate(loop)])

        with torch.no_grad():
            same = bool(torch.allclose(grouped(images), loop_forward(), atol=1e-4))
        rec: Dict[str, Any] = {"channels": c, "image_size": [h, w], "patch_size": p, "hidden_size": d,
                               "micro_batch_size": b, "threads": torch.get_num_threads(), "outputs_match": same}
        pairs: Dict[str, Sequence[Callable[[], Any]]] = {
            "forward": (lambda: _no_grad(grouped, images),
                        lambda: _no_grad(None, None, loop_forward)),
            "forward_backward": (lambda: grouped(images).backward(grad), lambda: loop_forward().backward(grad)),
        }
        if args.tokenizer_mask_ratio:
            keep = max(1, round(n_patches * (1 - args.tokenizer_mask_ratio)))
            index = torch.stack([torch.randperm(n_patches, generator=gen)[:keep] for _ in range(b)])
            grad_v = torch.randn(c, keep, b, d, generator=gen)
            pairs["masked_forward_backward"] = (
                lambda: grouped(images, index).backward(grad_v),
                lambda: select_patches(loop_forward(), index).backward(grad_v),
            )
            rec["visible_patches"] = keep
        for mode, (fg, fl) in pairs.items():
            tg, tsg = median_time(fg, [grouped], args.tokenizer_repeats)
            tl, tsl = median_time(fl, [loop], args.tokenizer_repeats)
            rec[mode] = {"grouped_s": tg, "loop_s": tl, "speedup": tl / tg, "grouped_times_s": tsg, "loop_times_s": tsl}
            print(f"[tokenizer] C={c} {mode}: grouped {tg * 1e3:.1f} ms, per-channel loop {tl * 1e3:.1f} ms -> "
                  f"{tl / tg:.2f}x ({rec['threads']} thread(s), outputs match: {same})", flush=True)
        rec["speedup"] = rec["forward_backward"]["speedup"]
        # The machine's bound at equal work: the same matrix products ([B*L, p*p] x [p*p, D] per
        # channel) as one batched matmul into a preallocated output, i.e. no allocation, layout or
        # per-call cost at all. Forward + backward is two such products (tokens, weight gradient).
        k = p * p
        a = torch.randn(c, b * n_patches, k, generator=gen)
        wmat = torch.randn(c, k, d, generator=gen)
        out = torch.empty(c, b * n_patches, d)
        t_mm, _ = median_time(lambda: torch.bmm(a, wmat, out=out), [], args.tokenizer_repeats)
        flop = 2.0 * c * b * n_patches * k * d
        rec["matmul_bound"] = {
            "gflops": flop / t_mm / 1e9,
            "forward_s": t_mm,
            "forward_backward_s": 2 * t_mm,
            # no implementation doing the loop's work can beat the loop by more than this
            "max_speedup_forward_backward": rec["forward_backward"]["loop_s"] / (2 * t_mm),
        }
        print(f"[tokenizer] C={c} matmul bound: {flop / t_mm / 1e9:.1f} GFLOP/s -> at most "
              f"{rec['matmul_bound']['max_speedup_forward_backward']:.2f}x over the loop (forward+backward)", flush=True)
        results.append(rec)
    return {"schema_version": SCHEMA_VERSION, "kind": "tokenizer_bench", "created": _now(), "command": command,
            "machine": machine_info(False), "records": results}


def _no_grad(module, images, fn=None):
    import torch

    with torch.no_grad():
        return fn() if fn is not None else module(images)


# ------------------------------------------------------------------------------------------------
# Channel-stage benchmark (fused vs reference)
# ------------------------------------------------------------------------------------------------

# fused and reference compute the same function; in fp32 they differ only by summation order
# (measured ~1e-6 of the largest magnitude). Above this the fused path is wrong and reports no win.
CHANNEL_STAGE_MATCH_REL = 1e-4
STAGE_PATHS = ("fused", "reference")


def _stage_model_config(args, channels: int, tree: List[int], impl: str, tp: int = 1):
    """The ``dchag`` model of one case at TP ``tp`` (G: ``--channel-groups``, default ``tp``),
    linear tree, ``model.channel_stage_impl=impl``."""
    from megatron_dchag.config import ModelConfig, resolve_model

    model = ModelConfig(num_channels=channels, image_size=tuple(args.image_size), patch_size=args.patch_size,
                        hidden_size=args.hidden_size, num_layers=args.num_layers, num_attention_heads=args.num_heads,
                        channel_groups=args.channel_groups or tp, strategy="dchag", aggregation_layer="linear",
                        aggregation_tree=list(tree), channel_stage_impl=impl)
    model = resolve_model(model, tp)
    model.validate(tp)
    return model


def _build_stage(args, model, device, tp: int = 1):
    """``ChannelAggregationStage`` as the encoder builds it: this TP rank's share (its channel
    groups and tree, the all-gather of the group tokens, its shard of the final TP cross-attention),
    the plan from ``parallel_state``. The same seed gives the same parameters on both paths (copied
    over anyway by the caller)."""
    import torch

    from megatron_dchag.config import ParallelConfig
    from megatron_dchag.layers.channel_stage import ChannelAggregationStage, make_channel_plan
    from megatron_dchag.models.encoder import make_transformer_config

    torch.manual_seed(args.seed)  # megatron's layers draw their initial weights from the global generator
    config = make_transformer_config(model, ParallelConfig(tensor_model_parallel_size=tp))
    return ChannelAggregationStage(model, config, make_channel_plan(model), args.seed).to(device)


def _stage_loss(stage, images, index):
    out = stage(images, index)
    return out, out.square().mean()


def _stage_peak(stage, images, index) -> Dict[str, Any]:
    """MemTracker over one forward + backward from no gradients (``.grad`` set to None): the
    parameters and the images are tracked as existing before it."""
    from torch.distributed._tools.mem_tracker import MemTracker

    stage.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(stage, images, *([index] if index is not None else []))
    with tracker:
        _stage_loss(stage, images, index)[1].backward()
    stage.zero_grad(set_to_none=True)
    snap = tracker.get_tracker_snapshot("peak")
    by = {(k if isinstance(k, str) else k.value): int(v) for k, v in (next(iter(snap.values())) if snap else {}).items()}
    return {"peak_mem_bytes": by.get("Total", 0), "mem_breakdown": {k: v for k, v in by.items() if k != "Total"}}


def _max_rel_diff(a, b) -> float:
    """``max |a - b| / max |b|`` (0 when both are zero)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _tp_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _stage_case_on_rank(args, channels: int, tree: List[int], fraction: float, device, tp: int) -> Dict[str, Any]:
    """This rank's part of one case: fused and reference stages (its share at TP ``tp``) with
    identical parameters on the same input; peaks and step times of this rank."""
    import torch
    import torch.distributed as dist

    h, w = args.image_size
    n_patches = (h // args.patch_size) * (w // args.patch_size)
    rec: Dict[str, Any] = {"channels": channels, "tree": list(tree), "tp": tp,
                           "channel_groups": args.channel_groups or tp, "visible_fraction": fraction,
                           "patch_positions": n_patches, "visible_patches": None, "status": "ok", "reason": None}
    try:
        models = {impl: _stage_model_config(args, channels, tree, impl, tp) for impl in STAGE_PATHS}
    except ValueError as exc:  # ConfigError included: e.g. a tree chunk larger than a group
        rec.update(status="skipped", reason=str(exc))
        return rec
    if not 0 < fraction <= 1:
        rec.update(status="skipped", reason=f"visible fraction {fraction} is not in (0, 1]")
        return rec
    stages = {impl: _build_stage(args, models[impl], device, tp) for impl in STAGE_PATHS}
    assert stages["fused"].fused and not stages["reference"].fused
    with torch.no_grad():
        ref_params = dict(stages["reference"].named_parameters())
        for name, p in stages["fused"].named_parameters():
            ref_params[name].copy_(p)
    # every rank draws the same all-channel batch and patch index, then keeps only its own channels
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.micro_batch_size, channels, h, w, generator=gen)
    lo, hi = stages["reference"].input_channel_range
    rec["input_channels"] = [lo, hi]
    if (lo, hi) != (0, channels):
        images = images[:, lo:hi].clone()  # not a view: only this rank's share is held (and tracked)
    images = images.to(device)
    index = None
    if fraction < 1:
        keep = max(1, round(n_patches * fraction))
        index = torch.stack([torch.randperm(n_patches, generator=gen)[:keep].sort().values
                             for _ in range(args.micro_batch_size)]).to(device)
        rec["visible_patches"] = keep
    else:
        rec["visible_patches"] = n_patches
    # 1. the same function: outputs and every parameter gradient (also the first warm-up step)
    outs, grads = {}, {}
    for impl, stage in stages.items():
        stage.zero_grad(set_to_none=True)
        out, loss = _stage_loss(stage, images, index)
        loss.backward()
        outs[impl] = out.detach()
        grads[impl] = {n: p.grad.detach().clone() for n, p in stage.named_parameters() if p.grad is not None}
        stage.zero_grad(set_to_none=True)
    rec["output_shape"] = list(outs["reference"].shape)
    rec["output_max_rel_diff"] = _max_rel_diff(outs["fused"], outs["reference"])
    if set(grads["fused"]) != set(grads["reference"]):
        rec["grad_max_rel_diff"] = float("inf")
    else:
        rec["grad_max_rel_diff"] = max(_max_rel_diff(grads["fused"][n], g) for n, g in grads["reference"].items())
    del outs, grads
    # 2. peak memory of one forward + backward
    for impl, stage in stages.items():
        rec[impl] = _stage_peak(stage, images, index)
    # 3. time: warm-up, then the two paths interleaved (alternating which goes first); at TP > 1 the
    # ranks start each step together (barrier) and the step's time is the slowest rank's (merge)
    barrier = dist.barrier if tp > 1 else (lambda: None)

    def step(stage) -> float:
        stage.zero_grad(set_to_none=True)
        _sync(device)
        barrier()
        t0 = time.perf_counter()
        _stage_loss(stage, images, index)[1].backward()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for stage in stages.values():
            step(stage)
    times: Dict[str, List[float]] = {impl: [] for impl in STAGE_PATHS}
    for i in range(args.steps):
        for impl in (STAGE_PATHS if i % 2 == 0 else STAGE_PATHS[::-1]):
            times[impl].append(step(stages[impl]))
    for impl in STAGE_PATHS:
        rec[impl]["step_times_s"] = times[impl]
    return rec


def merge_stage_records(per_rank: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One case from every TP rank's part: per path the peak is the max over ranks (breakdown of
    that rank), each step's time the slowest rank's, the time the median of those; the max rel
    diffs are the max over ranks. Sets the match status, the peak ratio and the speed-up."""
    failed = [r for r in per_rank if r.get("status") not in ("ok", "mismatch")]
    if failed:
        return dict(failed[0])
    rec = dict(per_rank[0])
    if "input_channels" in rec:
        rec["input_channels_per_rank"] = [r["input_channels"] for r in per_rank]
        rec.pop("input_channels")
    for impl in STAGE_PATHS:
        peaks = [r[impl]["peak_mem_bytes"] for r in per_rank]
        top = max(range(len(per_rank)), key=lambda k: peaks[k])
        path = dict(per_rank[top][impl])
        times = [max(steps) for steps in zip(*(r[impl]["step_times_s"] for r in per_rank))]
        path.update(peak_mem_bytes_per_rank=peaks, peak_rank=top, step_times_s=times,
                    step_time_s=statistics.median(times) if times else None)
        rec[impl] = path
    rec["output_max_rel_diff"] = max(r["output_max_rel_diff"] for r in per_rank)
    rec["grad_max_rel_diff"] = max(r["grad_max_rel_diff"] for r in per_rank)
    rec["outputs_match"] = bool(max(rec["output_max_rel_diff"], rec["grad_max_rel_diff"]) <= CHANNEL_STAGE_MATCH_REL)
    if rec["outputs_match"]:
        rec.update(status="ok", reason=None)
    else:
        rec.update(status="mismatch", reason=f"fused differs from reference by more than {CHANNEL_STAGE_MATCH_REL:g} "
                                             "of the largest magnitude (output or a gradient)")
    f, r = rec["fused"], rec["reference"]
    rec["peak_ratio"] = f["peak_mem_bytes"] / r["peak_mem_bytes"] if r["peak_mem_bytes"] else None
    rec["speedup"] = r["step_time_s"] / f["step_time_s"] if f["step_time_s"] else None
    return rec


def channel_stage_case(args, channels: int, tree: List[int], fraction: float, device, tp: int = 1) -> Dict[str, Any]:
    """One case on every rank of the TP job (this process alone at TP=1): the merged record."""
    import torch.distributed as dist

    try:
        local = _stage_case_on_rank(args, channels, tree, fraction, device, tp)
    except Exception as exc:  # noqa: BLE001 - reported per case (and still gathered at TP > 1)
        local = {"channels": channels, "tree": list(tree), "tp": tp, "visible_fraction": fraction,
                 "status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    if local["status"] == "skipped":  # decided from the configuration alone: the same on every rank
        return local
    per_rank: List[Any] = [local]
    if tp > 1:
        per_rank = [None] * _tp_world()
        dist.all_gather_object(per_rank, local)
    return merge_stage_records(per_rank)


def _channel_stage_records(args, tp: int, device, log: bool) -> List[Dict[str, Any]]:
    records = []
    for channels in args.channels:
        for tree in args.trees:
            for fraction in args.visible_fractions:
                rec = channel_stage_case(args, channels, tree, fraction, device, tp)
                gc.collect()
                records.append(rec)
                if log:
                    print(f"[channel-stage] TP={tp} C={channels} tree={_tree_str(tree)} visible={fraction:g}: "
                          + (f"fused {_mib(rec['fused']['peak_mem_bytes'])} MiB / {rec['fused']['step_time_s']:.3f} s, "
                             f"reference {_mib(rec['reference']['peak_mem_bytes'])} MiB / "
                             f"{rec['reference']['step_time_s']:.3f} s, max rel diff "
                             f"{max(rec['output_max_rel_diff'], rec['grad_max_rel_diff']):.1e} ({rec['status']})"
                             if "fused" in rec else f"{rec['status']}: {rec['reason']}"), flush=True)
    return records


def channel_stage_worker(rank: int, tp: int, port: int, args_dict: Dict[str, Any], result_path: str) -> None:
    """One TP rank of ``--channel-stage-bench --tp T``: every case, rank 0 writes the records."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(tp), LOCAL_WORLD_SIZE=str(tp))
    import io
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    from megatron_dchag.device import compute_device
    from megatron_dchag.distributed import destroy_distributed, initialize_distributed

    with contextlib.redirect_stdout(io.StringIO()):
        initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, seed=args.seed)
    try:
        records = _channel_stage_records(args, tp, compute_device(), log=rank == 0)
        if rank == 0:
            _atomic_write(result_path, json.dumps(records))
    finally:
        destroy_distributed()


def _channel_stage_tp_records(args, tp: int, threads: int, use_cuda: bool) -> List[Dict[str, Any]]:
    """Spawn the ``tp`` ranks (the training-step mode's launcher) and return rank 0's records."""
    import torch.multiprocessing as mp

    def every_case(status: str, reason: str) -> List[Dict[str, Any]]:
        return [{"channels": c, "tree": list(t), "tp": tp, "visible_fraction": f, "status": status, "reason": reason}
                for c in args.channels for t in args.trees for f in args.visible_fractions]

    if use_cuda and tp > _gpu_count():
        return every_case("skipped", f"TP={tp} needs {tp} GPUs, {_gpu_count()} present")
    args_dict = dict(vars(args), threads=threads)
    with tempfile.TemporaryDirectory(prefix="dchag_stage_bench_") as tmp:
        result_path = os.path.join(tmp, "records.json")
        try:
            with _rank_environ(threads, use_cuda):
                mp.start_processes(channel_stage_worker, args=(tp, find_free_port(), args_dict, result_path),
                                   nprocs=tp, join=True, start_method=local_rank_start_method(_RANK_PRELOAD))
            with open(result_path) as fh:
                return json.load(fh)
        except Exception as exc:  # noqa: BLE001 - a crashed rank fails the run's cases, reported
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            return every_case("failed", f"TP={tp} processes failed: {msg}")


def channel_stage_bench(args, command: str) -> Dict[str, Any]:
    """The ``dchag`` channel stage (``ChannelAggregationStage``: tokenizer, channel embedding,
    linear partial-aggregation tree, all-gather of the group tokens at TP > 1, final TP
    cross-attention) alone, fused against the reference path (``model.channel_stage_impl`` fused |
    reference): one process at TP=1, else ``--tp T`` ranks (gloo on CPU), each building its share
    of the stage as the encoder does (G defaults to T). Per case (channels x tree x visible
    fraction): both stages get identical parameters and the same input (each rank its own
    channels); loss = mean square of the stage output. First one forward + backward of each is
    compared (output and every parameter gradient, relative to the largest magnitude, max over
    ranks; a fused path off by more than :data:`CHANNEL_STAGE_MATCH_REL` is reported as a mismatch,
    and the run fails), then one forward + backward of each under MemTracker gives its peak (per
    rank; the max over ranks is reported), then ``--warmup`` untimed and ``--steps`` timed steps of
    the two paths interleaved; times are medians (of the slowest rank's time per step)."""
    import torch

    tps = args.tp or [1]
    if len(tps) != 1 or tps[0] < 1:
        raise SystemExit(f"--channel-stage-bench takes one TP size >= 1, got --tp {' '.join(map(str, tps))}")
    tp = tps[0]
    started = time.time()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    machine = machine_info(use_cuda)
    if tp == 1:
        threads = args.threads or 1
        torch.set_num_threads(threads)
        from megatron_dchag.device import compute_device

        from megatron_dchag.distributed import single_rank_job

        with single_rank_job(args.seed):
            records = _channel_stage_records(args, 1, compute_device(), log=True)
    else:
        threads = args.threads or max(1, (os.cpu_count() or 1) // tp)
        records = _channel_stage_tp_records(args, tp, threads, use_cuda)
    try:
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    per_rank = "per rank, the max over the TP ranks; " if tp > 1 else ""
    return {
        "schema_version": SCHEMA_VERSION, "kind": "channel_stage_bench", "created": _now(), "command": command,
        "title": args.title, "wall_time_s": round(time.time() - started, 1), "machine": machine,
        "memory_method": f"{per_rank}torch.distributed._tools.mem_tracker.MemTracker over one forward + backward "
                         "(parameters and images existing before it, no gradients)",
        "config": {
            "strategy": "dchag", "aggregation_layer": "linear", "tp": tp, "image_size": list(args.image_size),
            "patch_size": args.patch_size, "hidden_size": args.hidden_size, "num_heads": args.num_heads,
            "micro_batch_size": args.micro_batch_size, "channel_groups": args.channel_groups or tp,
            "dtype": "float32", "loss": "mean square of the stage output", "steps": args.steps,
            "warmup": args.warmup, "threads": threads, "seed": args.seed,
            "match_rel_tol": CHANNEL_STAGE_MATCH_REL,
        },
        "records": records,
    }


def channel_stage_markdown(doc: Dict[str, Any]) -> str:
    cfg, machine = doc["config"], doc["machine"]
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    load = ""
    if start:
        load = f", load average {start[0]:.2f} at the start" + (f" and {end[0]:.2f} at the end" if end else "")
    # TP > 1: each rank its share of the stage (its groups, the all-gather, its final cross-attention shard)
    slowest = " (each step's time: the slowest rank's, the ranks starting it together)" if cfg["tp"] > 1 else ""
    lines = [
        f"# {doc.get('title') or 'Fused channel stage vs reference (channel stage alone)'}",
        "",
        f"`ChannelAggregationStage`, TP={cfg['tp']}, `{cfg['strategy']}`, {cfg['aggregation_layer']} tree, "
        f"G = {cfg['channel_groups']}: image {cfg['image_size'][0]}x{cfg['image_size'][1]}, patch "
        f"{cfg['patch_size']}, D={cfg['hidden_size']}, batch {cfg['micro_batch_size']}, {cfg['dtype']}; loss = "
        f"{cfg['loss']}. Peak: {doc['memory_method']}. Time: median of {cfg['steps']} forward + backward steps "
        f"per path{slowest}, fused and reference interleaved, after {cfg['warmup']} warm-up step(s); "
        f"{cfg['threads']} thread(s){' per rank' if cfg['tp'] > 1 else ''}. Max rel diff: max |fused - reference| / "
        f"max |reference| of the output / of every parameter gradient{' (max over ranks)' if cfg['tp'] > 1 else ''} (a case above {cfg['match_rel_tol']:g} is a "
        "mismatch and reports no speed-up).",
        f"Machine: {machine.get('cpu_model', machine.get('processor'))}, {machine['cpu_count']} cores{load}.",
        "",
        f"Command: `{doc['command']}`",
        "",
        "| C | tree | input | fused peak MiB | reference peak MiB | fused / ref | fused s | reference s | speed-up "
        "| max rel diff (out / grads) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    other = []
    for r in doc["records"]:
        if "fused" not in r:
            other.append(r)
            continue
        if r["visible_fraction"] >= 1:
            inp = "all patches"
        else:
            inp = f"{r['visible_fraction']:.0%} visible ({r['visible_patches']} of {r['patch_positions']})"
        f, ref = r["fused"], r["reference"]
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['channels']} | {_tree_str(r['tree'])} | {inp} | {_mib(f['peak_mem_bytes'])} | "
            f"{_mib(ref['peak_mem_bytes'])} | {r['peak_ratio']:.1%} | {f['step_time_s']:.3f} | "
            f"{ref['step_time_s']:.3f} | {format(r['speedup'], '.2f') + 'x' if ok else r['status']} | "
            f"{r['output_max_rel_diff']:.1e} / {r['grad_max_rel_diff']:.1e} |")
    if other:
        lines += ["", "Cases not run:", ""]
        lines += [f"- C={r['channels']} tree={_tree_str(r['tree'])} visible={r['visible_fraction']:g}: "
                  f"{r['status']} — {r.get('reason')}" for r in other]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: Sequence[str]) -> str:
    """How this run was started: ``python tools/benchmark.py ARGV`` or ``dchag-benchmark ARGV``."""
    import shlex

    prog = sys.argv[0] if sys.argv and sys.argv[0] else "dchag-benchmark"
    if prog.endswith(".py"):
        head = ["python", os.path.relpath(os.path.abspath(prog), os.getcwd())]
    else:
        head = [os.path.basename(prog)]
    return shlex.join(head + list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            doc = json.load(fh)
        if doc.get("kind") == "channel_stage_bench":
            table = channel_stage_markdown(doc)
        else:
            table = markdown_table(doc["records"], doc)
        if args.markdown:
            _atomic_write(args.markdown, table)
        print(table)
        if args.plot:
            plot(doc["records"], args.plot, args.title or doc.get("title"))
        return 0
    if args.tokenizer_bench:
        out = tokenizer_bench(args, command_line(argv))
        if args.json_path:
            _atomic_write(args.json_path, json.dumps(out, indent=1) + "\n")
        return 0
    if args.channel_stage_bench:
        out = channel_stage_bench(args, command_line(argv))
        if args.json_path:
            _atomic_write(args.json_path, json.dumps(out, indent=1) + "\n")
        table = channel_stage_markdown(out)
        if args.markdown:
            _atomic_write(args.markdown, table)
        print(table)
        # a fast path whose output differs from the reference's reports no win: the run fails
        return 0 if all(r["status"] != "mismatch" for r in out["records"]) else 1
    import torch

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.mem_steps < 1 or args.steps < 1:
        print("error: --mem-steps and --steps must be >= 1", file=sys.stderr)
        return 2
    cases = enumerate_cases(args)
    started = time.time()
    machine = machine_info(use_cuda)
    records = run_cases(args, cases, use_cuda)
    try:
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    threads = args.threads or None
    meta = {
        "schema_version": SCHEMA_VERSION,
        "kind": "benchmark",
        "created": _now(),
        "command": command_line(argv),
        "title": args.title,
        "wall_time_s": round(time.time() - started, 1),
        "machine": machine,
        "memory_method": ("torch.cuda.max_memory_allocated" if use_cuda else
                          "torch.distributed._tools.mem_tracker.MemTracker (per rank; max over ranks)"),
        "config": {
            "image_size": list(args.image_size), "patch_size": args.patch_size, "hidden_size": args.hidden_size,
            "num_layers": args.num_layers, "num_heads": args.num_heads, "ffn_hidden_size": args.ffn_hidden_size,
            "channel_groups": args.channel_groups, "micro_batch_size": args.micro_batch_size,
            "bf16": bool(args.bf16), "recompute_channel_stage": bool(args.recompute_channel_stage),
            "with_head": bool(args.with_head), "final_aggregation": args.final_aggregation,
            "channel_stage_impls": list(args.channel_stage_impls),
            "steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
            "no_interleave": bool(args.no_interleave), "framework": FRAMEWORK,
            "optimizer": "megatron-core get_megatron_optimizer (Adam, training defaults)" + (
                " on fp32 main parameters (Float16Module)" if args.bf16 else "") + ", DDP fp32 main-grad buffer",
            "threads_note": (f"{threads} thread(s) per rank" if threads else "cores // TP threads per rank"),
        },
    }
    doc = dict(meta, records=records)
    if args.json_path:
        _atomic_write(args.json_path, json.dumps(doc, indent=1) + "\n")
    table = markdown_table(records, meta)
    if args.markdown:
        _atomic_write(args.markdown, table)
    print(table)
    if args.plot:
        plot(records, args.plot, args.title)
    failed = [r for r in records if r["status"] == "failed"]
    return 1 if failed and len(failed) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
