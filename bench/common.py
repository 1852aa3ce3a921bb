"""Timing and peak-memory helpers shared by the benchmarks (run from the repository root)."""

import ctypes
import gc
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import psutil
import torch

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: the RSS is read as the platform's allocator leaves it
    _LIBC = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextmanager
def rss_tracks_live_tensors() -> Iterator[None]:
    """glibc: inside, every block over 64 KiB is its own mmap, so a freed tensor leaves the RSS at
    once and the RSS peak is the peak of live tensors (what `peak_memory_during` reads).

    Only for measuring memory, never around timing: every large tensor then costs fresh,
    page-faulted memory, which slows a step by ~50% and penalises models that allocate more.
    On exit the thresholds go back to where glibc's dynamic defaults settle for tensors of a few
    MiB (mmap above 32 MiB, trim above 64 MiB).
    """
    if _LIBC is None:
        yield
        return
    _LIBC.malloc_trim(0)  # give back freed heap pages, so reusing them shows up in the RSS
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def peak_memory_during(fn: Callable[[], object], device: torch.device) -> tuple[object, int]:
    """Run `fn` once; return its result and the peak memory it added, in bytes.

    CUDA: allocator peak. CPU: resident-set peak over the baseline, sampled every 0.5 ms by a
    thread, inside `rss_tracks_live_tensors` (freed blocks go back to the OS at once, so the RSS
    tracks live tensors closely). Time nothing with it.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    with rss_tracks_live_tensors():
        return _rss_peak_during(fn)


def _rss_peak_during(fn: Callable[[], object]) -> tuple[object, int]:
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


def matmul_peak_flops(device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32,
                      kernels: bool = False) -> float:
    """This machine's measured dense matmul throughput (FLOP/s) with the kernels a model runs:
    PyTorch's default (`F.linear`), or with `kernels=True` also the opt-in oneDNN product of
    `hiertrans.cpu_kernels` (on an AVX-512 AMD CPU it ran fp32 at twice MKL's speed), the faster
    of the two. The ceiling a model's FLOP/s is measured against: same kernel set, same run."""
    import torch.nn.functional as F

    from hiertrans import cpu_kernels

    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    products = [lambda: F.linear(a, b)] + [lambda: cpu_kernels.onednn_linear(a, b)] * kernels
    best = float("inf")
    for product in products:
        for _ in range(3):
            product()
        best = min(best, *(timed(product, device) for _ in range(10)))
    return 2 * size**3 / best


def machine() -> str:
    """What a figure was measured on: CPU model and family, vector ISA, PyTorch's fp32 matmul backend,
    threads and load. Ratios move with these (MKL takes its AVX-512 kernels on Intel CPUs only)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = {key: re.search(rf"^{key}\s*: (.*)$", info, re.M) for key in ("model name", "cpu family", "model", "flags")}
    value = {key: m.group(1).strip() if m else "?" for key, m in field.items()}
    flags = set(value["flags"].split())
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "neither avx512f nor avx2"
    config = torch.__config__.show()
    versions = [m.group(0) for m in (re.search(r"Math Kernel Library Version [\w.]+", config),
                                     re.search(r"MKL-DNN v[\w.]+", config)) if m]
    backend = "MKL" if torch.backends.mkl.is_available() else "no MKL (OpenBLAS or other)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {value['model name']} (family {value['cpu family']}, model {value['model']}), {os.cpu_count()} "
            f"logical cores, {platform.machine()}; vector ISA: {isa} (torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); fp32 matmul: {backend} ({', '.join(versions)}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load:.2f}")


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


# glibc keeps freed memory instead of returning it to the kernel (no mmap per large tensor, no trim of
# the heap's top): every step reuses pages already mapped, where by default large tensors are mapped
# and page-faulted afresh each step. Read at process start; with another allocator, no effect.
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def faulted_bytes() -> int:
    """Memory this process has page-faulted in so far (minor faults: first touches of freshly mapped
    pages) x the page size. A lower bound where transparent huge pages map 2 MiB in one fault."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


def _serve(conn, make_step: Callable[[], Callable[[], object]], device: str, threads: int | None,
           warmup: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    step = make_step()
    for _ in range(warmup):
        step()
    conn.send("ready")
    faulted = []  # bytes page-faulted in per timed call
    while (request := conn.recv()) != "stop":
        if request == "time":
            before = faulted_bytes()
            seconds = timed(step, torch.device(device))
            faulted.append(faulted_bytes() - before)
            conn.send(seconds)
        elif request == "memory":
            conn.send(peak_memory_during(step, torch.device(device))[1])
        elif request == "faulted":
            conn.send(statistics.median(faulted) if faulted else float("nan"))


class StepWorker:
    """One contender in a process of its own, as a user's training job runs it.

    Sharing a process makes the contenders share one heap: on CPU, glibc's allocator then serves one
    model's tensors from memory the other fragmented or trimmed, and step times moved by up to 25%
    with what else the process held. Each worker builds its step with `make_step()` (a picklable
    callable; it runs in the worker), warms up, then times one step or measures its peak memory per
    request, so the caller can still alternate contenders round by round. Only one worker computes
    at a time. `env`: environment variables for the worker's process (e.g. `KEEP_HEAP`).
    """

    def __init__(self, make_step: Callable[[], Callable[[], object]], device: str = "cpu",
                 threads: int | None = None, warmup: int = 2, env: dict[str, str] | None = None):
        import multiprocessing as mp

        context = mp.get_context("spawn")  # fork would copy this process's heap and thread pools
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, make_step, device, threads, warmup),
                                       daemon=True)
        with patch.dict(os.environ, env or {}):  # the spawned interpreter inherits it (glibc reads MALLOC_* at start)
            self.process.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("benchmark worker failed to start")

    def time(self) -> float:
        """Seconds of one step."""
        self.conn.send("time")
        return self.conn.recv()

    def faulted_bytes(self) -> float:
        """Median bytes page-faulted in by the calls timed so far (see `faulted_bytes`)."""
        self.conn.send("faulted")
        return self.conn.recv()

    def peak_memory(self) -> int:
        """Peak bytes one step adds (see `peak_memory_during`: live tensors, whatever `env` set for
        glibc; it leaves glibc's thresholds fixed, so time nothing after it)."""
        self.conn.send("memory")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join()
