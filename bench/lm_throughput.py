"""Training throughput and peak memory: our HierarchicalTransformer vs simple-hierarchical-transformer.

    pip install ".[bench]"
    python bench/lm_throughput.py            # the issue's config: dim 256, depth 4, seq 1024, batch 4

Both models are built from the same config and measured in one process, alternating, on the same
batches; the medians are compared. Also prints our model FLOPs/s against this machine's measured
fp32 matmul peak (the physical ceiling).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fmt_ratio, matmul_peak_flops, params, peak_memory_during, timed  # noqa: E402
from hiertrans import HierarchicalTransformer  # noqa: E402


def build(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    from simple_hierarchical_transformer import HierarchicalTransformer as Reference

    config = dict(num_tokens=256, dim=args.dim, depth=args.depth, seq_len=args.seq_len, heads=args.heads,
                  dim_head=args.dim_head, hierarchies=(1, 2), window_sizes=(32, None), recon_loss_weight=0.1)
    torch.manual_seed(0)
    ours = HierarchicalTransformer(**config, hierarchical_ar_loss_weight=0.0, ignore_index=-1)
    torch.manual_seed(0)
    reference = Reference(**config, next_latent_loss_weight=0.0)
    # The reference builds next-latent modules even with that loss off; they take no part in a step.
    reference_used = params(reference) - params(reference.chunk_summarizers) - params(reference.latent_dynamics)
    return ours, reference, reference_used


def train_step_fn(model, optimizer, batch):
    def step():
        out = model(batch, return_loss=True)
        loss = out[0]
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    ours, reference, reference_used = build(args)
    ours, reference = ours.to(device), reference.to(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"params: ours {params(ours):,}  reference {reference_used:,} in use "
          f"({params(reference):,} built)  ratio {params(ours) / reference_used:.4f}")

    batch = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)
    tokens = args.batch * args.seq_len
    contenders = {"ours": ours, "reference": reference}
    if args.compile:  # torch.compile both: the fair comparison of compiled code
        compiled_ours, compiled_reference, _ = build(args)
        for model in (compiled_ours, compiled_reference):
            model.to(device).compile()
        contenders["ours+compile"] = compiled_ours
        contenders["reference+compile"] = compiled_reference
    # the same optimiser for both (fused AdamW: one pass over the parameters)
    steps = {name: train_step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), batch)
             for name, m in contenders.items()}
    for step in steps.values():  # warm-up: allocator, kernels, compilation
        for _ in range(2):
            step()

    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step, device))
    peak = {name: peak_memory_during(step, device)[1] for name, step in steps.items()}

    with FlopCounterMode(display=False) as counter:
        steps["ours"]()
    flops = counter.get_total_flops()
    peak_flops = matmul_peak_flops(device)

    print(f"\nconfig: dim {args.dim}, depth {args.depth}, seq_len {args.seq_len}, batch {args.batch}, heads "
          f"{args.heads}, dim_head {args.dim_head}, hierarchies (1, 2), window_sizes (32, None), recon 0.1")
    print(f"{'model':<14}{'s/step (median)':>16}{'tokens/s':>12}{'peak MiB':>11}")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name in steps:
        print(f"{name:<14}{median[name]:>16.3f}{tokens / median[name]:>12.0f}{peak[name] / 2**20:>11.0f}")
    pairs = [("ours", "reference"), ("ours+compile", "reference+compile"), ("ours+compile", "reference")]
    for name, ref in pairs:
        if name in steps and ref in steps:
            print(f"{name} / {ref}: tokens/s {fmt_ratio(median[ref], median[name])}, "
                  f"peak memory {fmt_ratio(peak[name], peak[ref])}")
    print("s/step per round: " + "; ".join(f"{name} " + "/".join(f"{t:.2f}" for t in seconds[name]) for name in steps))
    round_ratios = [r / o for o, r in zip(seconds["ours"], seconds["reference"])]
    print(f"ours / reference tokens/s within each round: min {min(round_ratios):.2f}x, "
          f"median {statistics.median(round_ratios):.2f}x, max {max(round_ratios):.2f}x")
    print(f"ours: {flops / 1e9:.1f} GFLOP per step, {flops / median['ours'] / 1e9:.1f} GFLOP/s = "
          f"{flops / median['ours'] / peak_flops:.0%} of this machine's fp32 matmul peak "
          f"({peak_flops / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
