"""Timing and memory helpers shared by ``sparsetrain bench`` and the scripts in ``benchmarks/``.

GPU timings are medians of ``triton.testing.do_bench``, over CUDA-graph replays where the
capture works (no host launch cost, as under ``compile_mode: reduce-overhead``).
"""

from __future__ import annotations

import gc
import time

import torch

try:  # the GPU timers need Triton; the step timer and memory helpers do not
    import triton
except ImportError:
    triton = None

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def time_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median-free plain timing: total time of ``steps`` consecutive steps (ms/step), last loss."""
    for _ in range(warmup):
        loss = step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    return (time.perf_counter() - t0) * 1000.0 / steps, float(loss)


GRAPH_FAILURES: list[str] = []


def bench(fn, graph: bool = True) -> float:
    """Median ms of ``fn``: over CUDA-graph replays (``triton.testing.do_bench_cudagraph``: no
    per-launch host cost, as under ``compile_mode: reduce-overhead``), or plain calls. A capture
    that fails falls back to plain calls and is listed in the output."""
    if graph:
        try:
            return graph_ms(fn)
        except Exception as e:  # noqa: BLE001 - report and fall back
            GRAPH_FAILURES.append(f"{getattr(fn, '__name__', 'fn')}: {type(e).__name__}")
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn, rep: int = 200) -> float:
    """Median ms of ``fn`` over CUDA-graph replays, after warm-up calls outside the capture
    (autotuning, cuBLAS handles). A failing capture raises."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
