"""CPU compatibility layer: run megatron-core on a machine without a GPU (DESIGN 4a).

This module owns *every* CPU work-around the project needs to run megatron-core 0.16.1 on CPU
with the gloo backend; no other module may patch ``torch.cuda`` or megatron-core. It edits no
megatron-core code. It is installed only when no GPU is present (``torch.cuda.is_available()`` is
False; on CUDA and ROCm machines :func:`install_cpu_compat` does nothing).

What megatron-core does that fails on a CPU-only torch, and what this layer does about it:

1. **Hard-coded ``torch.cuda`` calls** (``current_device``, ``synchronize``, ``get_rng_state``,
   ``manual_seed``, streams, events, memory statistics, nvtx ranges, ...). The layer replaces
   these attributes of ``torch.cuda`` (and of ``torch.cuda.random``/``.memory``/``.nvtx``, where
   the functions live) with CPU equivalents:

   * ``current_device()`` returns ``torch.device("cpu")``, not an index: megatron passes it as
     ``device=`` to factory functions, also inside autograd backward (e.g. the reduce-scatter in
     the backward of the sequence-parallel gather), and a CPU device is right there whether or
     not a ``TorchFunctionMode`` is active. ``device_count()`` is 1,
     ``set_device``/``synchronize``/``empty_cache`` do nothing, memory statistics are 0.
   * The "CUDA" random generator *is* the CPU default generator: ``get_rng_state``,
     ``set_rng_state``, ``manual_seed(_all)``, ``seed(_all)``, ``initial_seed`` and
     ``default_generators`` all act on ``torch.default_generator``. So megatron's
     ``CudaRNGStatesTracker.fork()`` (dropout in TP regions, ``tensor_parallel.checkpoint``
     recompute) really switches the generator CPU ops draw from. ``torch.cuda.is_initialized()``
     reports True so that ``torch.cuda._lazy_call`` (used by megatron's ``_set_cuda_rng_state``)
     runs its callback at once instead of queueing it forever.
   * ``Stream``/``ExternalStream``/``Event`` are no-op stand-ins (events record
     ``time.perf_counter()`` so ``elapsed_time`` works); ``stream(...)``/``device(...)`` are
     null contexts; ``current_stream``/``default_stream`` return a stand-in stream.

2. **CUDA devices and type names in tensor calls**, handled by a ``TorchFunctionMode``
   (:class:`CudaToCpuMode`):

   * ``device="cuda"``, ``"cuda:N"``, ``torch.device("cuda", N)`` or an integer ordinal given as
     ``device=`` become CPU; so do positional devices of ``Tensor.to``; ``Tensor.cuda()`` returns
     the (CPU) tensor; ``pin_memory=True``/``Tensor.pin_memory()`` do not pin (nothing to pin for);
     ``Tensor.record_stream`` does nothing.
   * Autograd backward: torch dispatches ``Tensor.backward``, ``torch.autograd.backward`` and
     ``torch.autograd.grad`` through the mode, and a mode is switched off while it handles a
     call, i.e. for the whole backward pass. The mode re-enters itself for these three calls, so
     custom ``Function.backward``s and megatron's activation recompute (which re-runs forward,
     with its ``device="cuda"`` causal mask, inside backward) run under it too.
   * ``Tensor.type()`` *without arguments* on a CPU tensor returns the CUDA type name
     (``"torch.cuda.FloatTensor"``), so megatron's checks such as
     ``param.type() == "torch.cuda.FloatTensor"`` (optimizer, distributed optimizer, grad clipping)
     pass. ``Tensor.type("torch.cuda.X")`` converts to the CPU type ``torch.X``.

3. **Log noise**: with the CUDA generator aliased to the CPU one, megatron's tracker warns
   "CPU RNG state changed within GPU RNG context" on every random op inside ``fork()``; that one
   message is filtered from the ``megatron.core.tensor_parallel.random`` logger.

How to use it: call :func:`install_cpu_compat` **once per process, before building models**
(``megatron_dchag.distributed.initialize_distributed`` does it for you). It is idempotent.

* Threads: a ``TorchFunctionMode`` is thread-local. Installing wraps thread start-up
  (``threading.Thread._bootstrap_inner``) so every Python thread started *after* installation runs
  with the mode; threads that were already running are not covered (call
  :func:`install_cpu_compat` inside them, which then only activates the mode there).
* Processes: ``fork`` children inherit everything. ``spawn``/``forkserver`` children start clean
  and must call :func:`install_cpu_compat` themselves before touching megatron-core (children that
  only move bytes, such as the manager process behind ``dist_checkpointing``'s async writer, need
  nothing).
* A backward pass started with the mode active runs with it (see 2.); one started where the mode
  is off (a thread started before installation, ``torch._C.DisableTorchFunction``) does not, and
  then only megatron's ``torch.cuda.current_device()`` allocations keep working.

Known limits: CUDA graphs, ``MemPool``/NCCL user buffers and ``torch.autocast("cuda")``
(megatron's ``autocast_dtype`` path) are not covered. megatron's ``torch.compile`` fusions
(``bias_activation_fusion``, ...) do run under the layer, but compiling takes tens of seconds on
CPU: keep them off there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "CudaToCpuMode",
    "install_cpu_compat",
    "is_cpu_compat_installed",
]

_CPU = torch.device("cpu")
_RNG_TRACKER_LOGGER = "megatron.core.tensor_parallel.random"
_RNG_TRACKER_WARNING = "CPU RNG state changed within GPU RNG context"

# The only global state of the layer: whether it is installed, and the replaced attributes
# (kept for inspection and debugging; the layer is never uninstalled within a process).
_install_lock = threading.Lock()
_installed = False
_replaced_attributes: Dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Device mapping helpers
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """True for anything that names a CUDA device: "cuda", "cuda:1", torch.device("cuda"), 3."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # An integer device means a CUDA ordinal in torch; there is no CUDA device here.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_type_name(type_spec: Any) -> Any:
    """Map a CUDA tensor type ("torch.cuda.FloatTensor" or the class) to its CPU counterpart."""
    if isinstance(type_spec, str) and type_spec.startswith("torch.cuda."):
        return "torch." + type_spec[len("torch.cuda."):]
    if isinstance(type_spec, type) and type_spec.__module__ == "torch.cuda":
        return getattr(torch, type_spec.__name__, type_spec)
    return type_spec


def _cuda_type_name(cpu_type_name: str) -> str:
    """"torch.FloatTensor" -> "torch.cuda.FloatTensor" (also "torch.sparse.X" -> cuda.sparse)."""
    if cpu_type_name.startswith("torch.") and not cpu_type_name.startswith("torch.cuda."):
        return "torch.cuda." + cpu_type_name[len("torch."):]
    return cpu_type_name


def _tensor_type(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if not args and not kwargs:
        name = torch.Tensor.type(tensor)
        return _cuda_type_name(name) if tensor.device.type == "cpu" else name
    args = tuple(_cpu_type_name(a) for a in args)
    if "dtype" in kwargs:
        kwargs["dtype"] = _cpu_type_name(kwargs["dtype"])
    return torch.Tensor.type(tensor, *args, **kwargs)


def _tensor_cuda(tensor: torch.Tensor, device: Any = None, non_blocking: bool = False,
                 memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    return torch.Tensor.to(tensor, _CPU, non_blocking=non_blocking, memory_format=memory_format)


def _tensor_to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    args = tuple(_CPU if i == 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
    return torch.Tensor.to(tensor, *args, **kwargs)


def _tensor_pin_memory(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor  # no accelerator to pin for


def _tensor_record_stream(tensor: torch.Tensor, stream: Any) -> None:
    return None


# Tensor methods whose meaning changes under the layer, keyed by the function torch dispatches.
_METHOD_OVERRIDES: Dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.type: _tensor_type,
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.to: _tensor_to,
    torch.Tensor.pin_memory: _tensor_pin_memory,
    torch.Tensor.record_stream: _tensor_record_stream,
}


# Calls that run autograd's engine; they are dispatched through torch function modes.
_AUTOGRAD_ENTRY_POINTS = frozenset(
    {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
)


class CudaToCpuMode(TorchFunctionMode):
    """``TorchFunctionMode`` that redirects CUDA device requests to the CPU.

    Maps ``device=`` keyword arguments naming CUDA (and integer ordinals) to CPU, turns off
    ``pin_memory=True``, and overrides a few tensor methods (see :data:`_METHOD_OVERRIDES`),
    notably ``Tensor.type()`` which reports the CUDA type name for CPU tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        if kwargs:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device=_CPU)
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        override = _METHOD_OVERRIDES.get(func)
        if override is not None:
            return override(*args, **kwargs)
        if func in _AUTOGRAD_ENTRY_POINTS:
            # torch pops the mode while a mode's __torch_function__ runs, and these calls run the
            # whole backward pass: re-enter the mode so that backward hooks, custom
            # Function.backward and megatron's recompute (a forward inside backward) see it.
            with self:
                return torch.overrides.redispatch_function(func, types, args, kwargs)
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


class _AnyDeviceGenerators(tuple):
    """``torch.cuda.default_generators`` stand-in: every index (int or device) is the CPU one.

    megatron indexes it with ``torch.cuda.current_device()``, which is a ``torch.device`` here.
    """

    def __getitem__(self, index: Any) -> torch.Generator:  # type: ignore[override]
        return torch.default_generator


class _CpuEvent:
    """No-op ``torch.cuda.Event``; ``record`` takes a host timestamp so timing still works."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, external: bool = False) -> None:
        self.enable_timing = enable_timing
        self._recorded_at: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("Both events must be recorded before calling elapsed_time().")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


class _CpuStream:
    """No-op ``torch.cuda.Stream``: all work on CPU is already ordered."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[_CpuEvent] = None) -> _CpuEvent:
        event = _CpuEvent() if event is None else event
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<megatron_dchag.cpu_compat stand-in stream on cpu>"


class _CpuExternalStream(_CpuStream):
    def __init__(self, stream_ptr: int = 0, device: Any = None, **kwargs: Any) -> None:
        super().__init__(device=device)


class _NullDeviceContext(contextlib.AbstractContextManager):
    """Stand-in for ``torch.cuda.device``/``device_of``/``stream``/``StreamContext``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM = _CpuStream()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def _get_rng_state_all() -> list:
    return [torch.default_generator.get_state()]


def _set_rng_state_all(new_states: Sequence[torch.Tensor]) -> None:
    for state in new_states:
        torch.default_generator.set_state(state)


def _manual_seed(seed: int) -> None:
    # Seed the generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _seed() -> None:
    torch.default_generator.seed()


def _initial_seed() -> int:
    return torch.default_generator.initial_seed()


def _mem_get_info(device: Any = None) -> tuple:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # psutil is a project dependency; stay harmless without it
        return 0, 0


def _get_device_properties(device: Any = None) -> Any:
    import types

    total = _mem_get_info()[1]
    return types.SimpleNamespace(
        name="cpu", major=0, minor=0, total_memory=total,
        multi_processor_count=os.cpu_count() or 1, gcnArchName="",
    )


def _nvtx_range_push(msg: str) -> int:
    return 0


def _nvtx_range_pop() -> int:
    return 0


def _replacements() -> Dict[str, Dict[str, Any]]:
    """Attribute replacements per module (``module path -> {attribute: value}``)."""
    rng = {
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": _get_rng_state_all,
        "set_rng_state_all": _set_rng_state_all,
        "manual_seed": _manual_seed,
        "manual_seed_all": _manual_seed,
        "seed": _seed,
        "seed_all": _seed,
        "initial_seed": _initial_seed,
    }
    memory = {
        "memory_allocated": _zero,
        "max_memory_allocated": _zero,
        "memory_reserved": _zero,
        "max_memory_reserved": _zero,
        "memory_stats": lambda *a, **k: {},
        "reset_peak_memory_stats": _noop,
        "reset_max_memory_allocated": _noop,
        "reset_accumulated_memory_stats": _noop,
        "empty_cache": _noop,
        "mem_get_info": _mem_get_info,
    }
    cuda = {
        **rng,
        **memory,
        "current_device": lambda: _CPU,
        "device_count": lambda: 1,
        "set_device": _noop,
        "synchronize": _noop,
        "ipc_collect": _noop,
        "is_initialized": lambda: True,
        "default_generators": _AnyDeviceGenerators((torch.default_generator,)),
        "get_device_name": lambda device=None: "cpu",
        "get_device_capability": lambda device=None: (0, 0),
        "get_device_properties": _get_device_properties,
        "Stream": _CpuStream,
        "ExternalStream": _CpuExternalStream,
        "Event": _CpuEvent,
        "stream": _NullDeviceContext,
        "StreamContext": _NullDeviceContext,
        "device": _NullDeviceContext,
        "device_of": _NullDeviceContext,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "set_stream": _noop,
    }
    nvtx = {
        "range_push": _nvtx_range_push,
        "range_pop": _nvtx_range_pop,
        "range_start": lambda msg: 0,
        "range_end": _noop,
        "mark": _noop,
    }
    return {
        "torch.cuda": cuda,
        "torch.cuda.random": rng,
        "torch.cuda.memory": memory,
        "torch.cuda.nvtx": nvtx,
    }


def _distinct_callable(name: str, value: Any, cache: Dict[str, Any]) -> Any:
    """One function object per attribute *name*.

    torch.compile's trace rules map every torch function object to one rule; sharing a single
    ``_noop`` between e.g. ``synchronize`` (in-graph) and ``empty_cache`` (skipped) makes
    ``torch.compile`` (used by megatron's ``jit_fuser``) fail with "Duplicate torch object".
    The same name in two modules (``torch.cuda.X`` and ``torch.cuda.random.X``) keeps sharing one
    object, exactly as in torch itself.
    """
    if name in cache:
        return cache[name]
    if not callable(value) or isinstance(value, type) or isinstance(value, tuple):
        cache[name] = value
        return value

    def replacement(*args: Any, **kwargs: Any) -> Any:
        return value(*args, **kwargs)

    replacement.__name__ = replacement.__qualname__ = name
    cache[name] = replacement
    return replacement


def _patch_torch_cuda() -> None:
    import importlib

    cache: Dict[str, Any] = {}
    for module_name, attributes in _replacements().items():
        module = importlib.import_module(module_name)
        for name, value in attributes.items():
            key = f"{module_name}.{name}"
            _replaced_attributes.setdefault(key, getattr(module, name, None))
            setattr(module, name, _distinct_callable(name, value, cache))


# --------------------------------------------------------------------------------------------
# Threads and logging
# --------------------------------------------------------------------------------------------


def _patch_thread_start() -> None:
    """Make every Python thread started from now on run with :class:`CudaToCpuMode`."""
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    @functools.wraps(original)
    def _bootstrap_inner_with_cpu_compat(self: threading.Thread) -> None:
        _activate_mode_on_this_thread()
        original(self)

    _replaced_attributes["threading.Thread._bootstrap_inner"] = original
    setattr(threading.Thread, "_bootstrap_inner", _bootstrap_inner_with_cpu_compat)


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
    """Install the CPU compatibility layer in this process (idempotent).

    Does nothing when a GPU is available (CUDA or ROCm). Call it once per process before building
    models; calling it again (e.g. from a thread that started before installation) only activates
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
            _patch_thread_start()
            logging.getLogger(_RNG_TRACKER_LOGGER).addFilter(_DropRngForkWarning())
            _installed = True
    _activate_mode_on_this_thread()
    return True
