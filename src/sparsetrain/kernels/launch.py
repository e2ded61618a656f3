"""Launching an autotuned Triton kernel without Triton's per-call Python path, after the first call.

``kernel[grid](...)`` costs tens of microseconds of host time per call: the autotuner's key and
``pre_hook``, the JIT's argument binding and specialisation, its cache look-up and the grid
lambda. An eager training loop (a library user's own loop, DDP, anything without CUDA graphs)
pays that for every product of every layer, more than the GPU time of a GPT-2-small layer
(benchmarks/NOTES_block_kernels.md). :class:`Launcher` runs the first call of each argument
signature through Triton, keeps what it chose (the compiled kernel, the winning config, the
grid, the descriptors' block shapes) and afterwards calls the compiled kernel's launcher itself.

The signature (:func:`signature`) is every scalar argument's type and value, every tensor's dtype and
16-byte alignment, every TMA descriptor's dtype, shape, strides and base alignment, and the
constexprs: a superset of what Triton specialises a compilation on (integers' value 1 and
divisibility by 16, pointers' alignment), so the kernel kept for a signature is the one Triton
would have launched. Under Triton's interpreter, or with a launch hook set (a profiler such as
proton), every call takes Triton's own path. ``SPARSETRAIN_TRITON_LAUNCH=triton`` in the
environment turns the cache off (for comparison). Not in the signature, so not to be changed
after the first call: Triton's debug and instrumentation knobs, and its JIT pre-run hooks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Launcher", "signature"]


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, (int, float, bool)) or arg is None:
        return (type(arg), arg)  # 1, True and 1.0 are equal keys but compile differently
    base = getattr(arg, "base", None)  # a TMA TensorDescriptor
    if isinstance(base, torch.Tensor):
        return (base.dtype, tuple(arg.shape), tuple(arg.strides), base.data_ptr() % 16 == 0, arg.padding)
    raise TypeError(f"no launch signature for an argument of type {type(arg).__name__}")


_SCALARS = (int, float, bool, type(None))


def signature(args: Sequence[Any], constexprs: dict[str, Any]) -> tuple:
    """What decides which compiled kernel a call runs (module docstring). One loop with the
    common cases inline (exact scalar types, plain tensors): it runs for every kernel call of an
    eager or compiled-without-graphs step, where its host time was a third of the launch path's
    (benchmarks/NOTES_block_kernels.md); anything else takes :func:`_arg_key`."""
    key = []
    for a in args:
        t = type(a)
        if t in _SCALARS:
            key.append((t, a))
        elif t is torch.Tensor:
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, (torch.Tensor, int, float)):  # subclasses: their own key, whatever attributes they have
            key.append(_arg_key(a))
        elif type(b := getattr(a, "base", None)) is torch.Tensor:  # a TMA descriptor over a plain tensor
            key.append((b.dtype, tuple(a.shape), tuple(a.strides), b.data_ptr() % 16 == 0, a.padding))
        else:
            key.append(_arg_key(a))
    key.extend(constexprs.items())
    return tuple(key)


_ENV = os.environ


def _direct_ok() -> bool:
    if _ENV.get("TRITON_INTERPRET") == "1" or _ENV.get("SPARSETRAIN_TRITON_LAUNCH") == "triton":
        return False
    runtime = _triton_runtime()
    return not (_hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook))


_RUNTIME: list = []  # triton.knobs.runtime and the driver's device/stream queries, looked up once


def _triton_runtime():
    if not _RUNTIME:
        from triton import knobs
        from triton.runtime import driver

        _RUNTIME.extend((knobs.runtime, driver.active.get_current_device, driver.active.get_current_stream))
    return _RUNTIME[0]


def _hooked(hook) -> bool:
    """A launch hook is set: Triton 3.6 keeps a chain of them (empty unless a profiler adds one),
    older Tritons one callable or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _device_and_stream() -> tuple[int, int]:
    """The current device and its current stream (a capturing CUDA graph's, during capture), as
    Triton's own launch path reads them."""
    _triton_runtime()
    device = _RUNTIME[1]()
    return device, _RUNTIME[2](device)


class _Entry:
    __slots__ = ("run", "function", "metadata", "grid", "tail", "shapes")

    def __init__(self, compiled, grid, tail, shapes):
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.grid, self.tail, self.shapes = grid, tail, shapes


class Launcher:
    """Calls ``kernel`` (a ``triton.autotune``-wrapped ``triton.jit`` function) as
    ``kernel[grid](*args, **constexprs)`` would; see the module docstring."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = kernel.fn.arg_names
        self.cache: dict[tuple, _Entry] = {}
        # First calls one at a time: Triton's autotuner sets best_config before it compiles (the
        # GIL is released for ptxas), so another thread's first call could overwrite it in between.
        self._first = threading.Lock()

    def __call__(self, grid: Callable[[dict], tuple] | tuple, args: Sequence[Any], constexprs: dict[str, Any]) -> None:
        if not _direct_ok():
            self.kernel[grid](*args, **constexprs)
            return
        device, stream = _device_and_stream()
        key = (device, *signature(args, constexprs))
        entry = self.cache.get(key)
        if entry is None:
            with self._first:
                self.cache[key] = self._first_call(grid, args, constexprs)
            return
        for i, shape in entry.shapes:
            args[i].block_shape = shape
        g0, g1, g2 = entry.grid
        entry.run(g0, g1, g2, stream, entry.function, entry.metadata, None, None, None, *args, *entry.tail)

    def _first_call(self, grid, args, constexprs) -> _Entry:
        """Triton's own launch; then what it chose, read back."""
        compiled = self.kernel[grid](*args, **constexprs)  # autotunes on the first call of its key
        if hasattr(compiled, "result"):  # an asynchronous compilation
            compiled = compiled.result()
        config = self.kernel.best_config
        named = {**dict(zip(self.names, args, strict=False)), **constexprs, **config.all_kwargs()}
        g = grid(named) if callable(grid) else grid
        g = (tuple(g) + (1, 1))[:3]
        tail = tuple(named[name] for name in self.names[len(args):])
        shapes = tuple((i, list(a.block_shape)) for i, a in enumerate(args) if hasattr(a, "block_shape"))
        return _Entry(compiled, g, tail, shapes)
