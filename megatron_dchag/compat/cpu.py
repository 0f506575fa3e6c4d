"""CPU layer: what megatron-core 0.16 needs to run on a machine without a GPU, with gloo.

megatron-core calls the CUDA API directly in code a CPU run goes through. This module answers
exactly those calls, *made by megatron-core's own code*, with CPU equivalents; every other caller
(this project, user code, torch itself on their behalf) sees real CPU-only torch:
``torch.zeros(2).type()`` is ``"torch.FloatTensor"``, and ``device="cuda"``,
``torch.cuda.current_device()`` or ``Tensor.cuda()`` raise as without the layer. A call is
megatron-core's when the first caller outside torch's own Python code is a ``megatron.core``
module. The layer edits no megatron-core code and is installed only when no GPU is present
(``initialize_distributed`` calls :func:`install_cpu_compat`; with CUDA or ROCm it does nothing).

The pieces, and the megatron-core 0.16.1 call sites that need them (``megatron.core.`` omitted):

1. **Functions of** ``torch.cuda``, replaced by stand-ins that give megatron-core's calls the CPU
   answer and pass other calls to torch's function:

   * ``current_device()`` is ``torch.device("cpu")`` (not an index: megatron passes it as
     ``device=``, also inside autograd backward): ``tensor_parallel.mappings`` (gather along the
     first/last dim, reduce-scatter), ``tensor_parallel.layers`` (sequence-parallel backward),
     ``pipeline_parallel.p2p_communication`` (receive buffers),
     ``distributed.param_and_grad_buffer`` (parameter and gradient buffers),
     ``utils.GlobalMemoryBuffer.get_tensor``, ``optimizer.distrib_optimizer`` (gathering the
     parameter state), ``dist_checkpointing.strategies.state_dict_saver`` (save finalization)
     and ``tensor_parallel.random`` (the RNG-state callback below).
   * ``synchronize()`` does nothing: ``pipeline_parallel.p2p_communication._communicate``,
     ``dist_checkpointing.strategies.filesystem_async`` (before writing).
   * ``current_stream()`` is a stream whose waits do nothing (a CPU operation has finished when
     it returns): megatron-core 0.19's ``distributed.param_and_grad_buffer``
     (``start_grad_sync`` waits on it for CUDA-graph gradient events; ``finish_grad_sync``).
   * The "CUDA" random generator is the CPU default generator, for ``tensor_parallel.random``
     (``model_parallel_cuda_manual_seed``, ``CudaRNGStatesTracker.add``/``fork`` and the
     activation recompute of ``tensor_parallel.checkpoint``): ``get_rng_state`` (also
     ``torch.cuda.random.get_rng_state``) and ``manual_seed`` act on
     ``torch.default_generator``, ``default_generators[i]`` is it for every ``i``, and
     ``is_initialized()`` is True so that ``torch.cuda._lazy_call`` (megatron's
     ``_set_cuda_rng_state``) runs its callback at once instead of queueing it forever. So
     ``fork()`` really switches the generator that CPU ops draw from.

2. **A** ``TorchFunctionMode`` (:class:`CudaToCpuMode`) for megatron-core's tensor calls. It
   looks at the caller only for the rare calls that name CUDA, so the common path stays a few
   dictionary look-ups:

   * ``device="cuda"`` (or ``"cuda:N"``, ``torch.device("cuda")``, an integer ordinal) becomes
     the CPU: ``pipeline_parallel.schedules`` (the forward-backward functions' loss
     accumulators), ``optimizer.optimizer`` (``MegatronOptimizer``/``ChainedOptimizer``),
     ``optimizer.clip_grads`` (the gradient norm), ``utils.local_multi_tensor_l2_norm``,
     ``transformer.utils.get_default_causal_mask`` (``DotProductAttention``, also re-run by
     recompute inside backward).
   * ``Tensor.cuda()`` returns the tensor: ``optimizer.distrib_optimizer`` (gathering the
     parameter state for a checkpoint).
   * ``Tensor.type()`` (without arguments) reports a CPU tensor's CUDA type name, e.g.
     ``"torch.cuda.FloatTensor"``: the parameter type checks of ``optimizer.optimizer`` (bf16 with
     fp32 master weights), ``optimizer.distrib_optimizer`` and ``optimizer.clip_grads``.
   * Autograd's entry points (``Tensor.backward``, ``torch.autograd.backward``/``grad``) run with
     the mode, whoever calls them: torch switches a mode off while it handles a call, here the
     whole backward pass, so the mode re-enters itself; megatron's recompute (a forward inside
     backward) and custom ``Function.backward``s then see it. This changes nothing for other code.

3. **A CPU device mesh for torch FSDP2**: ``DeviceMesh.from_group(group, "cuda")`` called by
   megatron-core (``distributed.torch_fully_sharded_data_parallel``, the mesh over the
   data-parallel group that ``TorchFullyShardedDataParallel`` hands to ``fully_shard``) builds a
   ``"cpu"`` mesh; other callers get torch's ``from_group`` unchanged.

4. **Log noise**: with the CUDA generator aliased to the CPU one, megatron's RNG tracker warns
   "CPU RNG state changed within GPU RNG context" on every random op inside ``fork()``; that one
   message is filtered from the ``megatron.core.tensor_parallel.random`` logger.

How to use it: call :func:`install_cpu_compat` **once per process, before building models**
(``megatron_dchag.distributed.initialize_distributed`` does it). It is idempotent. The mode is
thread-local: it is active on the thread that installed the layer; another thread that calls
megatron-core calls :func:`install_cpu_compat` first (which then only activates the mode there).
``fork`` children inherit everything; ``spawn``/``forkserver`` children that use megatron-core
install the layer themselves (children that only move bytes, such as the manager process behind
``dist_checkpointing``'s writer, need nothing).

Known limits: CUDA streams and events, memory statistics, CUDA graphs, ``MemPool``/NCCL user
buffers and ``torch.autocast("cuda")`` are not covered, nor are the megatron-core features that
use them (e.g. several distributed-optimizer instances, parameter or activation offloading);
megatron's ``torch.compile`` fusions (``bias_activation_fusion``, ...) are kept off on CPU.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import FrameType
from typing import Any, Callable, Dict, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "CudaToCpuMode",
    "install_cpu_compat",
    "is_cpu_compat_installed",
]

_CPU = torch.device("cpu")
_MEGATRON_CORE = "megatron.core"
_RNG_TRACKER_LOGGER = "megatron.core.tensor_parallel.random"
_RNG_TRACKER_WARNING = "CPU RNG state changed within GPU RNG context"

# The only global state of the layer: whether it is installed, and the replaced attributes
# (kept for inspection and debugging; the layer is never uninstalled within a process).
_install_lock = threading.Lock()
_installed = False
_replaced_attributes: Dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Who is calling
# --------------------------------------------------------------------------------------------


def _called_by_megatron(frame: Optional[FrameType]) -> bool:
    """Whether the first frame outside torch's own Python code, from ``frame`` outwards, belongs
    to megatron-core (torch's wrappers such as ``handle_torch_function`` sit in between)."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "torch" and not module.startswith("torch."):
            return module == _MEGATRON_CORE or module.startswith(_MEGATRON_CORE + ".")
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------------------------
# Device and type-name mapping
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """True for anything that names a CUDA device: "cuda", "cuda:1", torch.device("cuda"), 3."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # An integer device means a CUDA ordinal in torch; there is no CUDA device here.
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_name(cpu_type_name: str) -> str:
    """"torch.FloatTensor" -> "torch.cuda.FloatTensor" (also "torch.sparse.X" -> cuda.sparse)."""
    if cpu_type_name.startswith("torch.") and not cpu_type_name.startswith("torch.cuda."):
        return "torch.cuda." + cpu_type_name[len("torch."):]
    return cpu_type_name


def _tensor_type(caller: Optional[FrameType], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    name = torch.Tensor.type(tensor, *args, **kwargs)
    if not args and not kwargs and tensor.device.type == "cpu" and _called_by_megatron(caller):
        return _cuda_type_name(name)
    return name


def _tensor_cuda(caller: Optional[FrameType], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _called_by_megatron(caller):
        return tensor.to(_CPU, non_blocking=kwargs.get("non_blocking", False),
                         memory_format=kwargs.get("memory_format", torch.preserve_format))
    return torch.Tensor.cuda(tensor, *args, **kwargs)


# Tensor methods whose meaning changes for megatron's calls, keyed by the function torch dispatches.
_TENSOR_METHODS: Dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.type: _tensor_type,
    torch.Tensor.cuda: _tensor_cuda,
}

# Calls that run autograd's engine; they are dispatched through torch function modes.
_AUTOGRAD_ENTRY_POINTS = frozenset(
    {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
)


class CudaToCpuMode(TorchFunctionMode):
    """``TorchFunctionMode`` that runs megatron-core's CUDA requests on the CPU.

    For calls made by megatron-core's code only: maps a ``device=`` naming CUDA to the CPU and
    overrides ``Tensor.type`` and ``Tensor.cuda`` (see :data:`_TENSOR_METHODS`). Every other call
    is passed through unchanged. Re-enters itself for autograd's entry points.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        if func in _AUTOGRAD_ENTRY_POINTS:
            # torch pops the mode while a mode's __torch_function__ runs, and these calls run the
            # whole backward pass: re-enter the mode so that backward hooks, custom
            # Function.backward and megatron's recompute (a forward inside backward) see it.
            with self:
                return torch.overrides.redispatch_function(func, types, args, kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]) and _called_by_megatron(sys._getframe(1)):
            kwargs = dict(kwargs, device=_CPU)
        method = _TENSOR_METHODS.get(func)
        if method is not None:
            return method(sys._getframe(1), *args, **kwargs)
        return func(*args, **kwargs)


def _mode_active_on_this_thread() -> bool:
    return any(
        isinstance(m, CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack()
    )


def _activate_mode_on_this_thread() -> None:
    """Put a :class:`CudaToCpuMode` at the *bottom* of this thread's mode stack (once).

    At the bottom, a mode that a caller entered earlier with ``with SomeMode():`` still pops itself
    (and not ours) on exit.
    """
    if _mode_active_on_this_thread():
        return
    above = []
    while torch._C._len_torch_function_stack() > 0:
        above.append(torch.overrides._pop_mode())
    torch.overrides._push_mode(CudaToCpuMode())
    for mode in reversed(above):
        torch.overrides._push_mode(mode)


# --------------------------------------------------------------------------------------------
# torch.cuda stand-ins
# --------------------------------------------------------------------------------------------


class _DefaultGenerators(tuple):
    """``torch.cuda.default_generators`` stand-in: empty, as on any CPU-only torch, except that
    megatron-core's ``default_generators[i]`` is the CPU generator for every ``i`` (it indexes
    with ``torch.cuda.current_device()``, which is a ``torch.device`` here)."""

    def __getitem__(self, index: Any) -> Any:
        if _called_by_megatron(sys._getframe(1)):
            return torch.default_generator
        return tuple.__getitem__(self, index)


def _cpu_current_device() -> torch.device:
    return _CPU


def _cpu_synchronize(device: Any = None) -> None:
    return None


class _CpuStream:
    """What megatron-core's ``torch.cuda.current_stream()`` gets: waiting on it or on an event
    does nothing, since a CPU operation has finished when it returns."""

    def wait_event(self, event: Any = None) -> None:
        return None

    def wait_stream(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _cpu_current_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


def _cpu_is_initialized() -> bool:
    return True


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


# torch.cuda functions megatron-core calls -> what they do for megatron-core's calls.
_CPU_VERSIONS: Dict[str, Callable[..., Any]] = {
    "current_device": _cpu_current_device,
    "synchronize": _cpu_synchronize,
    "current_stream": _cpu_current_stream,
    "is_initialized": _cpu_is_initialized,
    "get_rng_state": _cpu_get_rng_state,
    "manual_seed": _cpu_manual_seed,
}
# Modules besides torch.cuda that megatron-core reads one of them from.
_ALSO_IN = {"get_rng_state": ("torch.cuda.random",)}


def _megatron_only(name: str, cpu_version: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.cuda.<name>``: ``cpu_version`` for megatron-core's calls, ``original`` for others.

    Each stand-in is its own function object: torch.compile's trace rules map every torch function
    object to one rule and fail on a shared one ("Duplicate torch object").
    """

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        if _called_by_megatron(sys._getframe(1)):
            return cpu_version(*args, **kwargs)
        return original(*args, **kwargs)

    stand_in.__name__ = stand_in.__qualname__ = name
    return stand_in


def _patch_torch_cuda() -> None:
    import importlib

    def replace(module_name: str, name: str, value: Any) -> None:
        module = importlib.import_module(module_name)
        _replaced_attributes.setdefault(f"{module_name}.{name}", getattr(module, name))
        setattr(module, name, value)

    for name, cpu_version in _CPU_VERSIONS.items():
        stand_in = _megatron_only(name, cpu_version, getattr(torch.cuda, name))
        for module_name in ("torch.cuda",) + _ALSO_IN.get(name, ()):
            replace(module_name, name, stand_in)
    replace("torch.cuda", "default_generators", _DefaultGenerators(torch.cuda.default_generators))


# --------------------------------------------------------------------------------------------
# Device mesh (torch FSDP2)
# --------------------------------------------------------------------------------------------


def _megatron_cpu_mesh(original: Callable[..., Any]) -> Callable[..., Any]:
    """``DeviceMesh.from_group`` that builds a CPU mesh where megatron-core asks for a CUDA one."""

    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(device_type) and _called_by_megatron(sys._getframe(1)):
            device_type = "cpu"
        return original(group, device_type, *args, **kwargs)

    from_group.__name__ = from_group.__qualname__ = "from_group"
    return from_group


def _patch_device_mesh() -> None:
    if not torch.distributed.is_available():
        return
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.from_group  # the function inside the staticmethod
    _replaced_attributes.setdefault("torch.distributed.device_mesh.DeviceMesh.from_group", original)
    DeviceMesh.from_group = staticmethod(_megatron_cpu_mesh(original))


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class _DropRngForkWarning(logging.Filter):
    """Drop megatron's "CPU RNG changed in GPU RNG context" warning: here they are one generator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_TRACKER_WARNING


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_cpu_compat_installed() -> bool:
    """Whether :func:`install_cpu_compat` has patched this process."""
    return _installed


def install_cpu_compat() -> bool:
    """Install the CPU layer in this process (idempotent).

    Does nothing when a GPU is available (CUDA or ROCm). Call it once per process before building
    models; calling it again (e.g. from another thread that calls megatron-core) only activates
    the ``TorchFunctionMode`` on the calling thread.

    Returns:
        True if the layer is installed in this process after the call.
    """
    global _installed
    if torch.cuda.is_available():
        return _installed
    with _install_lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_device_mesh()
            logging.getLogger(_RNG_TRACKER_LOGGER).addFilter(_DropRngForkWarning())
            _installed = True
    _activate_mode_on_this_thread()
    return True
