"""Training throughput and peak memory of our language models against their reference implementations.

    pip install ".[bench]"
    python bench/lm_throughput.py                        # both pairs, eager, default PyTorch kernels
    python bench/lm_throughput.py --cpu-kernels --compile --rounds 9
    python bench/lm_throughput.py --pairs hierarchical --keep-heap   # also both without per-step page faults

Two pairs, each at one config for both sides (dim 256, heads 4 x 64, seq 1024, batch 4):

- hierarchical: our HierarchicalTransformer vs simple-hierarchical-transformer 0.4.0, depth 4,
  hierarchies (1, 2), windows (32, None), reconstruction loss 0.1 (next-latent / hierarchical
  next-embedding losses off on both sides).
- hourglass: our HourglassTransformer vs hourglass-transformer-pytorch 0.0.6, depths (2, 4, 2)
  ("2@1 4@4 2@1"), shortening 4, linear down- and upsampling on both sides (the peer's
  `updown_sample_type="linear"`, `attn_resampling=False`).

Same kernels on both sides: default PyTorch; `--cpu-kernels` adds rows with
`hiertrans.cpu_kernels.apply` on both (it swaps nn.Linear and the norms in any model); `--compile`
adds rows with both under `torch.compile` (compiled vs compiled); `--keep-heap` adds rows with
both run with glibc told to keep the memory it frees (`bench.common.KEEP_HEAP`). By default glibc
maps each large tensor afresh and trims the heap, so a step page-faults its large temporaries again
every time (`faulted MiB/step`); how much depends on each model's allocation pattern, and on a VM
a fault costs microseconds. Every contender runs in a process
of its own (`bench.common.StepWorker`: one shared heap moved step times by up to 25%), all built
from the same seed and stepping the same fused AdamW on the same batch, timed alternately, one
step each per round; medians. Also our FLOP/s against this machine's measured fp32 matmul peak.
"""

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import KEEP_HEAP, StepWorker, fmt_ratio, machine, matmul_peak_flops, params  # noqa: E402
from hiertrans import HierarchicalTransformer, HourglassTransformer, cpu_kernels  # noqa: E402

PAIRS = {"hierarchical": ("ours hierarchical", "simple-hierarchical"),
         "hourglass": ("ours hourglass", "lucidrains hourglass")}


def config(args) -> dict:
    return dict(num_tokens=256, dim=args.dim, heads=args.heads, dim_head=args.dim_head)


def build(name: str, args) -> torch.nn.Module:
    """One contender from the shared config and seed."""
    torch.manual_seed(0)
    common = config(args)
    if name == "ours hierarchical":
        return HierarchicalTransformer(**common, depth=args.depth, seq_len=args.seq_len, hierarchies=(1, 2),
                                       window_sizes=(32, None), recon_loss_weight=0.1, hierarchical_ar_loss_weight=0.0,
                                       ignore_index=-1)
    if name == "simple-hierarchical":
        from simple_hierarchical_transformer import HierarchicalTransformer as Reference

        return Reference(**common, depth=args.depth, seq_len=args.seq_len, hierarchies=(1, 2), window_sizes=(32, None),
                         recon_loss_weight=0.1, next_latent_loss_weight=0.0)
    if name == "ours hourglass":
        return HourglassTransformer(**common, seq_len=args.seq_len, depths=tuple(args.depths),
                                    shorten_factors=(args.shorten,), downsample="linear", upsample="linear")
    if name == "lucidrains hourglass":
        from hourglass_transformer_pytorch import HourglassTransformerLM

        return HourglassTransformerLM(**common, max_seq_len=args.seq_len, depth=tuple(args.depths),
                                      shorten_factor=args.shorten, attn_resampling=False, updown_sample_type="linear")
    raise ValueError(f"unknown contender {name!r}")


def params_in_use(name: str, model: torch.nn.Module) -> int:
    if name == "simple-hierarchical":  # it builds next-latent modules even with that loss off; a step never uses them
        return params(model) - params(model.chunk_summarizers) - params(model.latent_dynamics)
    return params(model)


def loss_of(name: str, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if name == "lucidrains hourglass":  # logits only: the same next-byte cross-entropy as ours
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    return model(batch, return_loss=True)[0]


def make_train_step(name: str, kernels: bool, compile: bool, args, device: str):
    """Runs in a worker process: the model, the same fused AdamW for all, and a batch."""
    model = build(name, args).to(device)
    if kernels:
        cpu_kernels.apply(model)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)

    def step():
        loss_of(name, model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4, help="the hierarchical pair's layers")
    parser.add_argument("--depths", type=int, nargs=3, default=[2, 4, 2], help="the hourglass pair's layers")
    parser.add_argument("--shorten", type=int, default=4, help="the hourglass pair's shortening factor")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--cpu-kernels", action="store_true", help="also both sides with hiertrans.cpu_kernels")
    parser.add_argument("--compile", action="store_true", help="also both sides under torch.compile")
    parser.add_argument("--keep-heap", action="store_true",
                        help="also both sides with glibc keeping freed memory (no page faults per step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine())
    print(f"device {device}, one process per contender, {args.rounds} alternating rounds; config: dim {args.dim}, "
          f"heads {args.heads} x {args.dim_head}, seq_len {args.seq_len}, batch {args.batch}; hierarchical: depth "
          f"{args.depth}, hierarchies (1, 2), windows (32, None), recon 0.1; hourglass: depths {tuple(args.depths)}, "
          f"shortening {args.shorten}, linear down/upsampling")

    variants = [("", False, False, None)] + [(" +kernels", True, False, None)] * args.cpu_kernels
    variants += [(" +compile", False, True, None)] * args.compile
    variants += [(" +keep-heap", False, False, KEEP_HEAP)] * args.keep_heap
    names = [name for pair in args.pairs for name in PAIRS[pair]]
    for name in names:
        print(f"params {name}: {params_in_use(name, build(name, args)):,}")
    workers = {name + suffix: StepWorker(partial(make_train_step, name, kernels, compiled, args, device), device,
                                         args.threads, env=env)
               for suffix, kernels, compiled, env in variants for name in names}
    seconds = {name: [] for name in workers}
    for _ in range(args.rounds):  # alternate, so drifts of the machine hit every contender alike
        for name, worker in workers.items():
            seconds[name].append(worker.time())
    faulted = {name: worker.faulted_bytes() for name, worker in workers.items()}
    peak = {name: worker.peak_memory() for name, worker in workers.items()}
    for worker in workers.values():
        worker.close()

    tokens = args.batch * args.seq_len
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"\n{'contender':<32}{'s/step (median)':>16}{'tokens/s':>10}{'peak MiB':>10}{'faulted MiB/step':>18}")
    for name in workers:
        print(f"{name:<32}{median[name]:>16.3f}{tokens / median[name]:>10.0f}{peak[name] / 2**20:>10.0f}"
              f"{faulted[name] / 2**20:>18.0f}")
    print()
    for pair in args.pairs:
        ours, theirs = PAIRS[pair]
        for suffix, *_ in variants:
            a, b = ours + suffix, theirs + suffix
            per_round = [r / o for o, r in zip(seconds[a], seconds[b])]
            print(f"{a} / {b}: tokens/s {fmt_ratio(median[b], median[a])} (per round {min(per_round):.2f}-"
                  f"{max(per_round):.2f}x), peak memory {fmt_ratio(peak[a], peak[b])}")
    print("s/step per round: " + "; ".join(f"{n} " + "/".join(f"{t:.2f}" for t in s) for n, s in seconds.items()))

    peaks = {kernels: matmul_peak_flops(torch.device(device), kernels=kernels) for _, kernels, *_ in variants}
    for pair in args.pairs:
        name = PAIRS[pair][0]
        step = make_train_step(name, False, False, args, device)
        step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()  # the model's FLOPs: the same eager or compiled
        for suffix, kernels, *_ in variants:
            rate, peak_flops = flops / median[name + suffix], peaks[kernels]
            print(f"{name + suffix}: {flops / 1e9:.1f} GFLOP per step, {rate / 1e9:.1f} GFLOP/s = "
                  f"{rate / peak_flops:.0%} of this machine's fp32 matmul peak ({peak_flops / 1e9:.0f} GFLOP/s, "
                  f"{'F.linear or oneDNN' if kernels else 'F.linear'})")
    print(machine().rsplit("; ", 1)[-1] + " at the end")


if __name__ == "__main__":
    main()
