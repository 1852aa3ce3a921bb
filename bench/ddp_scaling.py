"""Data-parallel overhead on CPU: LM training tokens/s with 1 vs 2 processes (gloo DDP, one thread each).

    python bench/ddp_scaling.py                     # dim 128, depth 2, seq 256, batch 8 per process
    python bench/ddp_scaling.py --steps 40 --dim 192

Each process trains its own batches (`torch.multiprocessing.spawn`); the 2-process run all-reduces the
gradients through `DistributedDataParallel` after every backward. Reported per process and in total,
with efficiency = total_2 / (2 * total_1): 1.0 means the second process adds its full throughput and
the all-reduce costs nothing. The same two processes without DDP (no all-reduce) separate the cost
of DDP (DDP / independent) from the cost of sharing the cores (independent / 2 x single). On a machine
with exactly 2 cores shared with other work the figure is noisy and bounded by the cores that are
actually free, not by DDP.
"""

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from hiertrans import HierarchicalTransformer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results, ddp: bool = True) -> None:
    torch.set_num_threads(1)  # one core per process: the fair comparison, no OpenMP oversubscription
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank, as DDP requires
    model = HierarchicalTransformer(num_tokens=256, dim=args.dim, depth=args.depth, seq_len=args.seq_len,
                                    heads=args.heads, dim_head=args.dim // args.heads, hierarchies=(1, 2),
                                    window_sizes=(32, None))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and ddp else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g) for _ in range(4)]

    def step(i: int) -> None:
        loss, _ = net(batches[i % len(batches)], return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(i)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if world > 1:
        dist.barrier()  # the slowest rank sets the pace of synchronous data parallelism
    elapsed = time.perf_counter() - start
    results[rank] = args.steps * args.batch * args.seq_len / elapsed
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace, ddp: bool = True) -> list[float]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(world, free_port(), args, results, ddp), nprocs=world, join=True)
        return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    print(f"LM dim={args.dim} depth={args.depth} seq_len={args.seq_len} batch={args.batch}/process, "
          f"{args.steps} timed steps after {args.warmup} warm-up, 1 thread per process, "
          f"{os.cpu_count()} CPUs visible, torch {torch.__version__}")
    one = measure(1, args)
    two = measure(2, args)
    # the same two processes without DDP (no gradient all-reduce): what the cores alone allow
    alone = measure(2, args, ddp=False)
    total_1, total_2, total_alone = sum(one), sum(two), sum(alone)
    print(f"1 process           : {total_1:7.0f} tokens/s")
    print(f"2 processes, DDP    : {' + '.join(f'{t:.0f}' for t in two)} = {total_2:7.0f} tokens/s")
    print(f"2 processes, no DDP : {' + '.join(f'{t:.0f}' for t in alone)} = {total_alone:7.0f} tokens/s")
    print(f"efficiency total_2 / (2 * total_1) = {total_2 / (2 * total_1):.2f} (speed-up {total_2 / total_1:.2f}x); "
          f"DDP vs independent processes = {total_2 / total_alone:.2f}")


if __name__ == "__main__":
    main()
