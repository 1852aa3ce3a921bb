"""Where a language-model training step's time goes, and how close it runs to this machine's matmul peak.

    python bench/lm_profile.py                              # ours hierarchical, lm_throughput's config
    python bench/lm_profile.py --model "ours hourglass"     # any contender of bench/lm_throughput.py
    python bench/lm_profile.py --cpu-kernels                # with hiertrans.cpu_kernels applied

One process: the model of `bench/lm_throughput.py` (same config, seed, batch and fused AdamW), its
FLOPs per step counted by `FlopCounterMode` (forward + backward; the optimizer's elementwise work is
not counted), the median of `--steps` timed steps, the fp32 matmul peak measured in the same run with
the same kernel set (`bench.common.matmul_peak_flops`), and torch.profiler's self CPU time of one
step grouped by kind of work. "% of peak" is model FLOPs / step time / peak: the share of the step
that would be left if everything else cost nothing.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, matmul_peak_flops  # noqa: E402
from bench.lm_throughput import PAIRS, build, loss_of  # noqa: E402
from hiertrans import cpu_kernels  # noqa: E402

KINDS = {  # first match wins, on the aten op name
    "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "onednn"),
    "attention kernel (SDPA)": ("scaled_dot_product", "flash_attention"),
    "optimizer (fused AdamW)": ("adam",),
    "copies and layout (copy_, cat, pad, index)": ("aten::copy_", "aten::cat", "aten::constant_pad", "aten::index",
                                                   "aten::clone", "aten::contiguous", "aten::gather", "aten::scatter"),
    "loss (log_softmax, nll)": ("log_softmax", "nll_loss"),
    "allocation (empty, zeros, fill)": ("aten::empty", "aten::zero", "aten::fill_", "aten::resize"),
}


def kind_of(op: str) -> str:
    name = op.lower()
    return next((kind for kind, keys in KINDS.items() if any(key in name for key in keys)),
                "elementwise and reductions (norms, activations, residuals, rotary)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    contenders = [name for pair in PAIRS.values() for name in pair]
    parser.add_argument("--model", choices=contenders, default=contenders[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--depths", type=int, nargs=3, default=[2, 4, 2])
    parser.add_argument("--shorten", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--cpu-kernels", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    model = build(args.model, args)
    if args.cpu_kernels:
        cpu_kernels.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss_of(args.model, model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimizer state
    with FlopCounterMode(display=False) as counter:
        loss_of(args.model, model, batch).backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    peak = matmul_peak_flops(torch.device("cpu"), kernels=args.cpu_kernels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + event.self_cpu_time_total / 1e6
    total = sum(by_kind.values())
    print(f"\n{args.model}, batch {args.batch} x {args.seq_len}, cpu_kernels={args.cpu_kernels}, "
          f"{torch.get_num_threads()} threads")
    print(f"step {step_s:.3f} s (median of {args.steps}: {', '.join(f'{s:.3f}' for s in seconds)}); "
          f"{flops / 1e9:.1f} GFLOP per step (forward + backward) = {flops / step_s / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul peak of this machine, same kernels, this run: {peak / 1e9:.1f} GFLOP/s -> "
          f"the step runs at {flops / step_s / peak:.0%} of it")
    print(f"\nwhere one profiled step's time goes (self CPU time, {total:.3f} s under the profiler):")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<62}{s:8.3f} s {s / total:6.1%}")
    print("\ntop ops:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


if __name__ == "__main__":
    main()
