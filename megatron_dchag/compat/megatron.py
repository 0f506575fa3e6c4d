"""megatron-core version checks and the work-arounds for its internals, per version.

Each work-around names the megatron-core releases it is for (a :class:`VersionRange`) and does
nothing on others. ``tests/unit/test_cpu_compat.py`` reproduces, on the installed megatron-core,
the failure each one works around and fails when that no longer matches the range: when upstream
fixes it (delete the work-around or end its range) or a newer release still needs it (extend the
range), and when a private method a work-around replaces changes its signature.

Work-arounds (megatron-core 0.16), both for torch's Adam/AdamW, i.e. runs without apex or
Transformer Engine, where each parameter's Adam state holds its own ``step``:

* :func:`initialize_torch_adam_state`: ``DistributedOptimizer.state_dict()`` reads the ``step``
  of every parameter's state, and ``sharded_state_dict(is_loading=True)`` (the template a
  checkpoint is loaded into) starts from it: on a fresh optimizer, which has no state yet, it
  fails. The work-around gives every torch Adam its state as Adam's first step would (zero
  moments, ``step`` 0), so training is unchanged and a checkpoint of a fresh optimizer holds the
  same tensors as any later one.
* :func:`patch_distributed_optimizer_for_torch_adam`: loading a ``fully_reshardable`` (or
  ``fully_sharded_model_space``) distributed-optimizer checkpoint restores ``step`` from the
  parameter groups, leaves it out of the per-parameter tensors, then
  ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every state key into place
  and fails with ``KeyError: 'step'``. The work-around wraps that method of the given optimizer
  instances so the current (already restored) ``step`` stands in: copying it onto itself changes
  nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from megatron.core import package_info

__all__ = [
    "MEGATRON_CORE_VERSION",
    "SET_STATES_METHOD",
    "SET_STATES_PARAMETERS",
    "TORCH_ADAM_FRESH_STATE_VERSIONS",
    "TORCH_ADAM_STEP_LOAD_VERSIONS",
    "VersionRange",
    "initialize_torch_adam_state",
    "patch_distributed_optimizer_for_torch_adam",
]

# (major, minor, patch) of the installed megatron-core.
MEGATRON_CORE_VERSION: Tuple[int, int, int] = tuple(int(v) for v in package_info.VERSION[:3])


@dataclass(frozen=True)
class VersionRange:
    """megatron-core releases from ``first`` (inclusive) to ``before`` (exclusive)."""

    first: Tuple[int, int, int]
    before: Tuple[int, int, int]

    def __contains__(self, version: Tuple[int, int, int]) -> bool:
        return self.first <= tuple(version) < self.before

    def __str__(self) -> str:
        fmt = ".".join
        return f">={fmt(map(str, self.first))},<{fmt(map(str, self.before))}"


# Where each work-around applies; seen on 0.16.1 (see the tests).
TORCH_ADAM_FRESH_STATE_VERSIONS = VersionRange((0, 16, 0), (0, 17, 0))
TORCH_ADAM_STEP_LOAD_VERSIONS = VersionRange((0, 16, 0), (0, 17, 0))

# The private method that patch_distributed_optimizer_for_torch_adam wraps, and its parameters.
SET_STATES_METHOD = "_set_main_param_and_optimizer_states"
SET_STATES_PARAMETERS = ("self", "model_param", "tensors")


def _megatron_optimizers(optimizer) -> Iterator:
    """The optimizers of a ``ChainedOptimizer`` (or the optimizer itself)."""
    return iter(getattr(optimizer, "chained_optimizers", [optimizer]))


def _initialize_torch_adam_state(optimizer) -> None:
    for opt in _megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "init_state_fn", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or init is None or len(inner.state) > 0:
            continue
        init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def initialize_torch_adam_state(optimizer) -> None:
    """Give each fresh torch Adam of a megatron optimizer its state now (zero moments, ``step`` 0),
    the values torch's Adam would create at its first step; a later checkpoint load overwrites
    them. Only on :data:`TORCH_ADAM_FRESH_STATE_VERSIONS`."""
    if MEGATRON_CORE_VERSION in TORCH_ADAM_FRESH_STATE_VERSIONS:
        _initialize_torch_adam_state(optimizer)


def _patch_set_states(opt) -> None:
    original = getattr(opt, SET_STATES_METHOD)

    def set_states(model_param, tensors):
        if "step" not in tensors and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            state = opt.optimizer.state[main_param]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return original(model_param, tensors)

    setattr(opt, SET_STATES_METHOD, set_states)
    opt._dchag_torch_adam_step_patched = True


def patch_distributed_optimizer_for_torch_adam(optimizer) -> None:
    """Let the distributed optimizers in ``optimizer`` load reshardable checkpoints with torch's
    Adam (idempotent). Only on :data:`TORCH_ADAM_STEP_LOAD_VERSIONS`.

    Raises:
        RuntimeError: if the private method it wraps is missing or has other parameters.
    """
    if MEGATRON_CORE_VERSION not in TORCH_ADAM_STEP_LOAD_VERSIONS:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    method = getattr(DistributedOptimizer, SET_STATES_METHOD, None)
    params = tuple(inspect.signature(method).parameters) if method is not None else None
    if params != SET_STATES_PARAMETERS:
        raise RuntimeError(
            f"megatron-core {package_info.__version__}: DistributedOptimizer.{SET_STATES_METHOD}"
            f"{'' if params is None else params} is not the {SET_STATES_PARAMETERS} this work-around "
            "wraps; revisit megatron_dchag.compat.megatron"
        )
    for opt in _megatron_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not getattr(opt, "_dchag_torch_adam_step_patched", False):
            _patch_set_states(opt)
