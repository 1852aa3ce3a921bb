"""Where `hiertrans.cpu_kernels` pay: configs/lm.yaml's training step, eager, with and without them.

    python bench/cpu_kernels.py                    # lm.yaml's model, a step's 16 x 256 bytes as one batch
    python bench/cpu_kernels.py --rounds 20 --threads 1

Contenders: plain PyTorch, all kernels, and each kernel alone. Each runs in a process of its own
(as `bench.common.StepWorker`: a shared heap moves step times), built from the same seed and
stepping AdamW on the same batch, as the task trains; rounds alternate between contenders, each
opening a round in turn, so the machine's drifts hit all alike. Per contender: the median and the
best wall-clock step, and the median CPU time of the process (on a machine shared with other
jobs, the CPU time and the best step move least). Then each kernel's op alone at the step's
shapes, and both matmul backends on the step's products and a 2048^2 one. Prints the machine: CPU
model, vector ISA, PyTorch's matmul backend, threads, load.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, timed  # noqa: E402
from hiertrans import HierarchicalTransformer, cpu_kernels  # noqa: E402

LM_YAML = dict(num_tokens=256, dim=128, depth=4, seq_len=256, heads=4, dim_head=32, ff_mult=4, hierarchies=(1, 2),
               window_sizes=(32, None), hierarchical_stride=1, recon_loss_weight=0.1,
               hierarchical_ar_loss_weight=0.25, ignore_index=-1)
CONTENDERS = {"plain": (), "all kernels": tuple(cpu_kernels.KERNELS), **{k: (k,) for k in cpu_kernels.KERNELS}}


def make_train_step(kernels: tuple[str, ...], batch: int):
    """Runs in a worker process: lm.yaml's model with `kernels` on, AdamW, one fixed batch."""
    torch.manual_seed(0)
    model = cpu_kernels.apply(HierarchicalTransformer(**LM_YAML), kernels=kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(0, 256, (batch, LM_YAML["seq_len"] + 1), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(data, return_loss=True)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _serve(conn, kernels: tuple[str, ...], batch: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    step = make_train_step(kernels, batch)
    for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
        step()
    conn.send("ready")
    while conn.recv() == "step":
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        conn.send((time.perf_counter() - wall, time.process_time() - cpu))


class Worker:
    """One contender in a process of its own; `step()` -> (wall-clock s, process CPU s) of one step."""

    def __init__(self, kernels: tuple[str, ...], batch: int, threads: int | None):
        import multiprocessing as mp

        context = mp.get_context("spawn")  # fork would copy this process's heap and thread pools
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, kernels, batch, threads), daemon=True)
        self.process.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("benchmark worker failed to start")

    def step(self) -> tuple[float, float]:
        self.conn.send("step")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join()


def matmul_gflops(rows: int, inner: int, out: int, repeats: int = 20) -> dict[str, float]:
    x, w = torch.randn(rows, inner), torch.randn(out, inner)
    result = {}
    for name, product in (("MKL (F.linear)", F.linear), ("oneDNN", cpu_kernels.onednn_linear)):
        for _ in range(3):
            product(x, w)
        seconds = min(timed(lambda p=product: p(x, w), torch.device("cpu")) for _ in range(repeats))
        result[name] = 2 * rows * inner * out / seconds / 1e9
    return result


def op_pairs(batch: int) -> dict[str, tuple]:
    """Each kernel's op at the step's shapes: (plain fn, kernel fn, inputs), timed forward + backward."""
    from hiertrans.cpu_kernels import CPUTokenShift, rms_norm, with_previous_block_kernel
    from hiertrans.layers import token_shift, with_previous_block

    n, dim = LM_YAML["seq_len"], LM_YAML["dim"]
    x = torch.randn(batch * n, dim, requires_grad=True)
    w = torch.randn(4 * dim, dim, requires_grad=True)
    h = torch.randn(batch, n, dim, requires_grad=True)
    gain = torch.ones(dim, requires_grad=True)
    kv = torch.randn(batch, LM_YAML["heads"], n, LM_YAML["dim_head"], requires_grad=True)
    return {
        f"linear {batch * n} x {dim} -> {4 * dim}": (F.linear, cpu_kernels.onednn_linear, (x, w)),
        f"rms_norm {batch} x {n} x {dim}": (lambda t, g: F.rms_norm(t, (dim,), g, 1e-6),
                                            lambda t, g: rms_norm(t, (dim,), g, 1e-6), (h, gain)),
        f"token_shift {batch} x {n} x {dim}": (token_shift, CPUTokenShift(), (h,)),
        f"window layout {tuple(kv.shape)}, 32": (lambda t: with_previous_block(t, 32),
                                                 lambda t: with_previous_block_kernel(t, 32), (kv,)),
    }


def op_seconds(fn, inputs: tuple) -> float:
    out = fn(*inputs)
    grad = torch.randn_like(out)

    def run():
        torch.autograd.grad(fn(*inputs), inputs, grad)
    return timed(run, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="alternating measurement rounds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(f"\nLM training step: configs/lm.yaml's model (dim 128, depth 4, hierarchies (1, 2), windows (32, None)), "
          f"batch {args.batch} x {LM_YAML['seq_len']}, AdamW, eager fp32, {args.rounds} alternating rounds")

    workers = {name: Worker(kernels, args.batch, args.threads) for name, kernels in CONTENDERS.items()}
    wall: dict[str, list[float]] = {name: [] for name in workers}
    cpu: dict[str, list[float]] = {name: [] for name in workers}
    names = list(workers)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # each goes first in turn
            seconds, cpu_seconds = workers[name].step()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    for worker in workers.values():
        worker.close()

    median, best = statistics.median, min
    print(f"{'kernels':<15}{'wall s/step: median':>20}{'best':>7}{'CPU s/step':>12}"
          f"{'speed-up: median':>18}{'best':>7}{'CPU':>7}{'per round':>12}")
    for name in workers:
        ratios = [p / t for p, t in zip(wall["plain"], wall[name])]
        print(f"{name:<15}{median(wall[name]):>20.3f}{best(wall[name]):>7.3f}{median(cpu[name]):>12.3f}"
              f"{median(wall['plain']) / median(wall[name]):>17.2f}x{best(wall['plain']) / best(wall[name]):>6.2f}x"
              f"{median(cpu['plain']) / median(cpu[name]):>6.2f}x{min(ratios):>7.2f}-{max(ratios):.2f}x")
    tokens = args.batch * LM_YAML["seq_len"]
    print(f"(plain: {tokens / median(wall['plain']):.0f} tokens/s at the median step)")

    print("\neach kernel's op, forward + backward, best of 50 alternating runs (microseconds):")
    for what, (plain_fn, kernel_fn, inputs) in op_pairs(args.batch).items():
        times = {"plain": [], "kernel": []}
        for _ in range(50):
            times["plain"].append(op_seconds(plain_fn, inputs))
            times["kernel"].append(op_seconds(kernel_fn, inputs))
        plain_us, kernel_us = (min(t) * 1e6 for t in times.values())
        print(f"  {what:<36} plain {plain_us:8.0f}  kernel {kernel_us:8.0f}  {plain_us / kernel_us:5.2f}x")

    print("\nfp32 products, GFLOP/s (best of 20):")
    for rows, inner, out, what in ((tokens, 128, 384, f"the step's qkv ({tokens} x 128 -> 384)"),
                                   (tokens, 128, 512, f"feed-forward in ({tokens} x 128 -> 512)"),
                                   (2048, 2048, 2048, "2048^2 square")):
        gflops = matmul_gflops(rows, inner, out)
        print(f"  {what:<40}" + "  ".join(f"{k} {v:6.1f}" for k, v in gflops.items()))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
