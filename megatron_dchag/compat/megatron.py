"""megatron-core version checks and the work-arounds for its internals, per version.

Each work-around names the megatron-core releases it is for (a :class:`VersionRange`) and does
nothing on others. ``tests/unit/test_cpu_compat.py`` reproduces, on the installed megatron-core,
the failure each one works around and fails when that no longer matches the range: when upstream
fixes it (delete the work-around or end its range) or a newer release still needs it (extend the
range), and when a private method a work-around replaces changes its signature.

Work-arounds (megatron-core 0.16 to 0.19), the first two for torch's Adam/AdamW, i.e. runs without apex
or Transformer Engine, where each parameter's Adam state holds its own ``step``, the third for
torch FSDP2:

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
* :func:`patch_torch_fsdp2_finish_grad_sync`: ``finalize_model_grads`` calls every model chunk's
  ``finish_grad_sync(force_all_reduce=...)``, but ``TorchFullyShardedDataParallel`` inherits
  ``finish_grad_sync(self)`` without that parameter, so the first step of an FSDP2 run fails with
  ``TypeError: ... unexpected keyword argument 'force_all_reduce'``. The work-around gives the
  given wrapper instances a ``finish_grad_sync`` that takes the argument and does what the
  inherited one does (nothing: FSDP2 has reduce-scattered the gradients during the backward).
  megatron-core 0.19 defines the method itself.

And one for torch (2.10 and later, seen on 2.13) under megatron-core's checkpointing of FSDP2
parameters:

* :func:`local_tensor_identity`: megatron-core's optimizer ``sharded_state_dict`` finds each
  parameter's checkpoint entry by ``id(param.to_local())`` (``get_optim_param_to_id_map``).
  ``DTensor.to_local()`` of an ``nn.Parameter`` DTensor now returns a new view on every call (so
  that the result is a Parameter too), so no id matches (or a freed view's id is reused). Inside
  the context manager the given DTensors are plain tensors for that check (their ``_is_param``
  flag is cleared), and ``to_local()`` returns their own local tensor, as before.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Tuple

import torch
from megatron.core import package_info

__all__ = [
    "MLP_AS_SUBMODULE_VERSIONS",
    "mlp_submodule_spec",
    "MEGATRON_CORE_VERSION",
    "SET_STATES_METHOD",
    "SET_STATES_PARAMETERS",
    "TORCH_ADAM_FRESH_STATE_VERSIONS",
    "TORCH_ADAM_STEP_LOAD_VERSIONS",
    "TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS",
    "TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS",
    "TORCH_VERSION",
    "VersionRange",
    "initialize_torch_adam_state",
    "local_tensor_identity",
    "patch_distributed_optimizer_for_torch_adam",
    "patch_torch_fsdp2_finish_grad_sync",
]

# (major, minor, patch) of the installed megatron-core.
MEGATRON_CORE_VERSION: Tuple[int, int, int] = tuple(int(v) for v in package_info.VERSION[:3])


def _release(version: str) -> Tuple[int, int, int]:
    """(major, minor, patch) of a version string such as "2.13.0+cpu"."""
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split("+")[0].split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


# (major, minor, patch) of the installed torch.
TORCH_VERSION: Tuple[int, int, int] = _release(torch.__version__)


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


# Where each work-around applies; both seen on 0.16.1 and 0.19.2 (see the tests; 0.17 and 0.18
# were not tried, and the range ends before the first release not tested).
TORCH_ADAM_FRESH_STATE_VERSIONS = VersionRange((0, 16, 0), (0, 20, 0))
TORCH_ADAM_STEP_LOAD_VERSIONS = VersionRange((0, 16, 0), (0, 20, 0))
# Seen on 0.16.1; 0.19.2 accepts force_all_reduce (the releases in between were not tried).
TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS = VersionRange((0, 16, 0), (0, 17, 0))

# torch releases whose DTensor.to_local() of a Parameter returns a new view (seen on 2.13).
TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS = VersionRange((2, 10, 0), (3, 0, 0))

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


def patch_torch_fsdp2_finish_grad_sync(model) -> None:
    """Let ``finalize_model_grads`` call ``model.finish_grad_sync(force_all_reduce=...)`` on a
    ``TorchFullyShardedDataParallel`` instance (idempotent). Only on
    :data:`TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS`."""
    if MEGATRON_CORE_VERSION not in TORCH_FSDP2_FINISH_GRAD_SYNC_VERSIONS:
        return
    if getattr(model, "_dchag_finish_grad_sync_patched", False):
        return
    inherited = model.finish_grad_sync

    def finish_grad_sync(force_all_reduce: bool = False) -> None:
        inherited()

    model.finish_grad_sync = finish_grad_sync
    model._dchag_finish_grad_sync_patched = True


@contextmanager
def local_tensor_identity(dtensors: Iterable[torch.Tensor]):
    """Within the block, ``to_local()`` (without grad) of each given ``nn.Parameter`` DTensor is
    its own local tensor, which megatron-core's optimizer checkpointing matches parameters by.
    Only on :data:`TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS`; elsewhere it changes nothing."""
    cleared = []
    if TORCH_VERSION in TORCH_PARAMETER_TO_LOCAL_VIEW_VERSIONS:
        cleared = [t for t in dtensors if t.__dict__.get("_is_param", False)]
    for t in cleared:
        t._is_param = False
    try:
        yield
    finally:
        for t in cleared:
            t._is_param = True


# --------------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------------

# Releases whose TransformerLayer builds a dense MLP through ``MLP.as_mlp_submodule`` (to pass the
# process groups) and rewraps a ``ModuleSpec(module=MLP)`` into it with a warning per build. Seen on
# 0.19.2; 0.16.1 has no ``as_mlp_submodule`` (0.17 and 0.18 were not tried).
MLP_AS_SUBMODULE_VERSIONS = VersionRange((0, 19, 0), (0, 20, 0))


def mlp_submodule_spec(submodules):
    """The ``mlp`` entry of a transformer-layer spec for megatron's dense ``MLP`` with
    ``submodules`` (an ``MLPSubmodules``): a ``ModuleSpec``, or on
    :data:`MLP_AS_SUBMODULE_VERSIONS` the ``as_mlp_submodule`` builder that the layer would
    otherwise rewrap the spec into (the same module, without the warning)."""
    import functools

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if MEGATRON_CORE_VERSION in MLP_AS_SUBMODULE_VERSIONS and hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)
