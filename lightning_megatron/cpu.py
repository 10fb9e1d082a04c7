"""Running Megatron-Core on CPU processes (gloo).

Megatron-Core assumes CUDA in a handful of places: it creates tensors with
``device=torch.cuda.current_device()``, calls ``Tensor.cuda()``, compares ``param.type()`` with
``"torch.cuda.FloatTensor"``, swaps the CUDA RNG state for model-parallel dropout and touches
streams, events and memory statistics. :func:`cpu_mode` makes all of those land on the CPU, and
only while it is active: the strategy enters it when the Trainer runs on CPU and leaves it at
teardown, so nothing changes on GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch._dynamo
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:1"``, ``0``, ``torch.device``) to CPU."""
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers classify params by their CUDA tensor type name.
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _NoStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: on CPU every op is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        # wait_stream, record_event, synchronize, ...: nothing to wait for; return another
        # stand-in so chains such as stream.record_event().synchronize() work.
        return lambda *args, **kwargs: _NoStream()

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _host_copy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    # mcore's MoE dispatcher copies split sizes to the host as numpy arrays, but only for CUDA
    # tensors; CPU tensors would reach all_to_all_single as tensors, which it rejects.
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _megatron_patches() -> list[tuple[Any, str, Any]]:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    return [
        # The model-parallel RNG tracker swaps the *CUDA* generator state around dropout in
        # tensor-parallel regions; on CPU the same dance happens on the CPU generator.
        (mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (token_dispatcher, "maybe_move_tensor_to_cpu", _host_copy),
    ]


def _cuda_patches() -> list[tuple[Any, str, Any]]:
    # Each stand-in is its own object: torch.compile's trace rules map torch.cuda attributes by
    # identity and refuse one object registered under two names.
    cuda = torch.cuda
    return [
        # A device object, not the usual index: autograd runs backward outside torch-function
        # modes, and mcore allocates there with device=torch.cuda.current_device().
        (cuda, "current_device", lambda: _CPU),
        (cuda, "set_device", lambda *a, **k: None),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
        (cuda, "Stream", type("Stream", (_NoStream,), {})),
        (cuda, "Event", type("Event", (_NoStream,), {})),
        (cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (cuda, "current_stream", lambda *a, **k: _NoStream()),
        (cuda, "default_stream", lambda *a, **k: _NoStream()),
        (cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (cuda, "memory_allocated", lambda *a, **k: 0),
        (cuda, "max_memory_allocated", lambda *a, **k: 0),
        (cuda, "memory_reserved", lambda *a, **k: 0),
        (cuda, "memory_stats", lambda *a, **k: {}),
        (cuda.nvtx, "range_push", lambda *a, **k: None),
        (cuda.nvtx, "range_pop", lambda *a, **k: None),
        # mcore compiles a few small MoE helpers; on CPU that would need a C++ toolchain and
        # minutes of compiling for kernels that take microseconds. Run them eagerly.
        (torch._dynamo.config, "disable", True),
    ]


class _DropTrackerWarning(logging.Filter):
    # On CPU the "CUDA" and CPU generators are the same generator, so mcore's check that the CPU
    # state did not move inside a forked CUDA-RNG region always fires; it means nothing here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """Run Megatron-Core code on CPU for the duration of the block.

    Example::

        with cpu_mode():
            model = GPTModel(config, spec, vocab_size=128, max_sequence_length=64)
    """
    patches = _cuda_patches() + _megatron_patches()
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    log_filter = _DropTrackerWarning()
    tracker_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    for obj, name, value in patches:
        setattr(obj, name, value)
    tracker_logger.addFilter(log_filter)
    mode = _CudaToCpu()
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)
        tracker_logger.removeFilter(log_filter)
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
