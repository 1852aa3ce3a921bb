"""Training throughput and peak memory: our HierarchicalTransformer vs simple-hierarchical-transformer.

    pip install ".[bench]"
    python bench/lm_throughput.py            # the issue's config: dim 256, depth 4, seq 1024, batch 4

Both models are built from the same config and seed, each in a process of its own (as a training job
runs it: in one shared process, glibc's heap state left by one model moved the other's step time by
up to 25%), and timed alternately, one step per model per round, on the same batch; the medians are
compared. Also prints our model FLOPs/s against this machine's measured
fp32 matmul peak (the physical ceiling), and with `--kernels` our model with its linears on
PyTorch's default matmul (`set_onednn_linear(False)`), to show how much of the ratio is oneDNN.
"""

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import StepWorker, fmt_ratio, matmul_peak_flops, params  # noqa: E402
from hiertrans import HierarchicalTransformer  # noqa: E402
from hiertrans.layers import set_onednn_linear  # noqa: E402

ONEDNN_OFF = "ours (no oneDNN)"


def config(args) -> dict:
    return dict(num_tokens=256, dim=args.dim, depth=args.depth, seq_len=args.seq_len, heads=args.heads,
                dim_head=args.dim_head, hierarchies=(1, 2), window_sizes=(32, None), recon_loss_weight=0.1)


def build(name: str, args) -> torch.nn.Module:
    """`ours` or `reference`, from the same config and seed."""
    torch.manual_seed(0)
    if name == "ours":
        return HierarchicalTransformer(**config(args), hierarchical_ar_loss_weight=0.0, ignore_index=-1)
    from simple_hierarchical_transformer import HierarchicalTransformer as Reference

    return Reference(**config(args), next_latent_loss_weight=0.0)


def reference_params_in_use(reference: torch.nn.Module) -> int:
    # The reference builds next-latent modules even with that loss off; they take no part in a step.
    return params(reference) - params(reference.chunk_summarizers) - params(reference.latent_dynamics)


def make_train_step(name: str, compile: bool, args, device: str):
    """Runs in a worker process: the model, the same fused AdamW for both, and a batch."""
    if name == ONEDNN_OFF:
        set_onednn_linear(False)
        name = "ours"
    model = build(name, args).to(device)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)

    def step():
        loss = model(batch, return_loss=True)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--compile", action="store_true", help="also measure both models under torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--kernels", action="store_true",
                        help="also measure ours with its linears on PyTorch's default matmul instead of oneDNN")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    ours, reference = build("ours", args), build("reference", args)
    print(f"device {device}, torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
          f"one process per model")
    print(f"params: ours {params(ours):,}  reference {reference_params_in_use(reference):,} in use "
          f"({params(reference):,} built)  ratio {params(ours) / reference_params_in_use(reference):.4f}")

    tokens = args.batch * args.seq_len
    variants = [("ours", False), ("reference", False)] + [(ONEDNN_OFF, False)] * args.kernels
    variants += [("ours", True), ("reference", True)] * args.compile
    workers = {name + "+compile" * compiled: StepWorker(partial(make_train_step, name, compiled, args, device),
                                                        device, args.threads)
               for name, compiled in variants}
    seconds = {name: [] for name in workers}
    for _ in range(args.rounds):  # alternate, so drifts of the machine hit every model alike
        for name, worker in workers.items():
            seconds[name].append(worker.time())
    peak = {name: worker.peak_memory() for name, worker in workers.items()}
    for worker in workers.values():
        worker.close()

    step = make_train_step("ours", False, args, device)
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak_flops = matmul_peak_flops(torch.device(device))

    print(f"\nconfig: dim {args.dim}, depth {args.depth}, seq_len {args.seq_len}, batch {args.batch}, heads "
          f"{args.heads}, dim_head {args.dim_head}, hierarchies (1, 2), window_sizes (32, None), recon 0.1")
    print(f"{'model':<18}{'s/step (median)':>16}{'tokens/s':>12}{'peak MiB':>11}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name in workers:
        print(f"{name:<18}{median[name]:>16.3f}{tokens / median[name]:>12.0f}{peak[name] / 2**20:>11.0f}")
    pairs = [("ours", "reference"), (ONEDNN_OFF, "reference"), ("ours+compile", "reference+compile"),
             ("ours+compile", "reference")]
    for name, ref in pairs:
        if name in workers and ref in workers:
            print(f"{name} / {ref}: tokens/s {fmt_ratio(median[ref], median[name])}, "
                  f"peak memory {fmt_ratio(peak[name], peak[ref])}")
    rounds = "; ".join(f"{name} " + "/".join(f"{t:.2f}" for t in seconds[name]) for name in workers)
    print(f"s/step per round: {rounds}")
    round_ratios = [r / o for o, r in zip(seconds["ours"], seconds["reference"])]
    print(f"ours / reference tokens/s within each round: min {min(round_ratios):.2f}x, "
          f"median {statistics.median(round_ratios):.2f}x, max {max(round_ratios):.2f}x")
    print(f"ours: {flops / 1e9:.1f} GFLOP per step, {flops / median['ours'] / 1e9:.1f} GFLOP/s = "
          f"{flops / median['ours'] / peak_flops:.0%} of this machine's fp32 matmul peak "
          f"({peak_flops / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
