"""Training and inference throughput (images/s) and peak memory: HierarchialViT vs timm's PVT v2.

All models run in ONE process and are measured in alternation (ours, theirs, ours, theirs, ...;
the median over rounds is reported), so load from other processes on a shared machine hits every
model alike and the ratios stay fair even when the absolute numbers are noisy.

Settings:
  32 px,  batch 128: hvit_cifar (10 classes) vs pvt_v2_b0(num_classes=10)
  224 px, batch 16:  hvit_tiny (PVT v1 Tiny, 1000 classes) vs pvt_v2_b0 (1000 classes) and, as the
                     size-matched peer of hvit_tiny, pvt_v2_b1 (14.0M params)

GFLOPs/img: forward FLOPs per image (2 per multiply-add) from torch's FlopCounterMode.
A training step is forward + cross-entropy + backward + AdamW step; inference is a forward under
`torch.inference_mode()` in eval mode. Peak memory is the extra resident memory (CPU) or allocator
peak (CUDA) during one step, measured apart from the timing runs.

    PYTHONPATH=. python bench/vit_throughput.py                      # defaults: ~5 min on 2 busy cores
    PYTHONPATH=. python bench/vit_throughput.py --sizes 32 --rounds 3  # quick: the 32 px target only
"""

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt_ratio, params, peak_memory_during, timed  # noqa: E402
from hiertrans.vit import create_model  # noqa: E402


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "infer": []})
    memory: dict[str, int] = field(default_factory=dict)

    def runner(self, mode: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
        model, opt = self.model, self.optimizer

        def train() -> None:
            model.train()
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def infer() -> None:
            model.eval()
            with torch.inference_mode():
                for _ in range(steps):
                    model(x)

        return train if mode == "train" else infer


def contender(name: str, model: nn.Module, device: torch.device, channels_last: bool) -> Contender:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Contender(name, model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05))


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image (matmuls, convs, attention), counted by torch's FlopCounterMode."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops()


def measure(title: str, contenders: list[Contender], batch: int, img: int, classes: int, steps: int,
            rounds: int, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    print(f"\n== {title}: {img}x{img} px, batch {batch}, {steps} steps x {rounds} rounds "
          f"(median), {classes} classes", flush=True)
    for mode in ("train", "infer"):
        for c in contenders:  # warm-up: allocator, kernels, optimizer state
            c.runner(mode, x, y, args.warmup)()
        for _ in range(rounds):
            for c in contenders:  # alternate: ours, theirs, ours, theirs, ...
                c.seconds[mode].append(timed(c.runner(mode, x, y, steps), device))
        for c in contenders:
            c.memory[mode] = peak_memory_during(c.runner(mode, x, y, 1), device)[1]

    def ips(c: Contender, mode: str) -> float:
        return batch * steps / statistics.median(c.seconds[mode])

    flops = {c.name: forward_flops(c.model, x) for c in contenders}
    header = (f"{'model':<26}{'params':>9}{'GFLOPs/img':>11}{'train img/s':>13}{'infer img/s':>13}"
              f"{'train MiB':>11}{'infer MiB':>11}")
    print(header)
    print("-" * len(header))
    for c in contenders:
        print(f"{c.name:<26}{params(c.model) / 1e6:>8.2f}M{flops[c.name] / 1e9:>11.3f}"
              f"{ips(c, 'train'):>13.1f}{ips(c, 'infer'):>13.1f}"
              f"{c.memory['train'] / 2**20:>11.0f}{c.memory['infer'] / 2**20:>11.0f}")
    ours = contenders[0]
    for theirs in contenders[1:]:
        print(f"ours/{theirs.name.split()[0]}: params {fmt_ratio(params(ours.model), params(theirs.model))}, "
              f"FLOPs {fmt_ratio(flops[ours.name], flops[theirs.name])}, "
              f"train img/s {fmt_ratio(ips(ours, 'train'), ips(theirs, 'train'))}, "
              f"infer img/s {fmt_ratio(ips(ours, 'infer'), ips(theirs, 'infer'))}, "
              f"train memory {fmt_ratio(ours.memory['train'], theirs.memory['train'])}, "
              f"infer memory {fmt_ratio(ours.memory['infer'], theirs.memory['infer'])}")
    for mode in ("train", "infer"):  # the spread says how much to trust the medians
        spread = ", ".join(f"{c.name.split()[0]} " + "/".join(f"{batch * steps / s:.3g}"
                                                               for s in c.seconds[mode]) for c in contenders)
        print(f"  {mode} img/s per round: {spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-32", type=int, default=128, help="batch size at 32 px")
    parser.add_argument("--batch-224", type=int, default=16, help="batch size at 224 px")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed measurement at 32 px")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements per model at 32 px")
    parser.add_argument("--steps-224", type=int, default=1, help="steps per timed measurement at 224 px")
    parser.add_argument("--rounds-224", type=int, default=3,
                        help="alternating measurements per model at 224 px")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--sizes", default="32,224", help="which settings to run: 32, 224 or both")
    parser.add_argument("--peers-224", default="pvt_v2_b0,pvt_v2_b1", help="timm models to compare at 224 px")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 by default: on the shared 2-core machine a second "
                             "thread mostly spins waiting for a descheduled first (per-round numbers "
                             "varied 5x with 2 threads under load); 0 keeps torch's default")
    parser.add_argument("--channels-last", action="store_true", help="channels-last inputs and conv weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = {int(s) for s in args.sizes.split(",")}
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, channels_last={args.channels_last}")

    cl = args.channels_last
    if 32 in sizes:
        torch.manual_seed(0)
        measure("CIFAR size", [
            contender("hvit_cifar", create_model("hvit_cifar", num_classes=10), device, cl),
            contender("pvt_v2_b0", timm.create_model("pvt_v2_b0", num_classes=10), device, cl),
        ], args.batch_32, 32, 10, args.steps, args.rounds, args, device)
    if 224 in sizes:
        torch.manual_seed(0)
        peers = [p for p in args.peers_224.split(",") if p]
        measure("ImageNet size", [
            contender("hvit_tiny (PVT v1 Tiny)", create_model("hvit_tiny"), device, cl),
            *(contender(p, timm.create_model(p), device, cl) for p in peers),
        ], args.batch_224, 224, 1000, args.steps_224, args.rounds_224, args, device)


if __name__ == "__main__":
    main()
