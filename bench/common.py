"""Timing and peak-memory helpers shared by the benchmarks (run from the repository root)."""

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

import psutil
import torch

try:  # glibc: serve every block over 64 KiB by mmap so freed tensors leave the RSS at once
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
except (OSError, AttributeError):
    pass


def peak_memory_during(fn: Callable[[], object], device: torch.device) -> tuple[object, int]:
    """Run `fn` once; return its result and the peak memory it added, in bytes.

    CUDA: allocator peak. CPU: resident-set peak over the baseline, sampled every 0.5 ms by a
    thread (the allocator returns freed blocks to the OS, so RSS tracks live tensors closely).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    proc = psutil.Process(os.getpid())
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out = fn()
    finally:
        done.set()
        watcher.join()
    return out, max(0, peak - base)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, synchronising the device around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_peak_flops(device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """This machine's measured dense matmul throughput (FLOP/s): the physical ceiling for our models."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    runs = 10
    seconds = min(timed(lambda: a @ b, device) for _ in range(runs))
    return 2 * size**3 / seconds


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"
