"""Training and inference throughput (images/s) and peak memory: HierarchialViT vs timm's PVT v2.

Each model runs in a process of its own (as a training job does: models sharing one process share
glibc's heap, and one's allocation pattern slowed the other's steps), and the models are measured in
alternation (ours, theirs, ours, theirs, ...; the median over rounds is reported), so load from
other processes on a shared machine hits every model alike and the ratios stay fair even when the
absolute numbers are noisy.

Settings (default PyTorch kernels on every side; `--cpu-kernels` applies `hiertrans.cpu_kernels` to
every model alike):
  32 px,  batch 128: hvit_cifar (10 classes) vs pvt_v2_b0 adapted to 32 px (spatial reduction
                     (2, 1, 1, 1), as hvit_cifar's: the stock (8, 4, 2, 1) pools stages 1-3 of a 32 px
                     image to a single key) and vs the stock pvt_v2_b0
  224 px, batch 16:  hvit_tiny (PVT v1 Tiny, 1000 classes) vs its size-matched peer pvt_v2_b1 (14.0M
                     params) and pvt_v2_b0

GFLOPs/img: forward FLOPs per image (2 per multiply-add) from torch's FlopCounterMode.
A training step is forward + cross-entropy + backward + AdamW step; inference is a forward under
`torch.inference_mode()` in eval mode. Peak memory is the extra resident memory (CPU) or allocator
peak (CUDA) during one step, measured apart from the timing runs.

    python bench/vit_throughput.py                      # defaults: ~5 min on 2 busy cores
    python bench/vit_throughput.py --sizes 32 --rounds 3  # quick: the 32 px targets only
    python bench/vit_throughput.py --compile              # compiled vs compiled
    python bench/vit_throughput.py --keep-heap            # glibc keeps freed memory on every side

`train faulted MiB/step`: memory a training step page-faults in (first touches of fresh pages: by
default glibc maps large tensors afresh and trims its heap, so every step faults its large
temporaries in again; `--keep-heap` stops that, the same for every model).
"""

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import KEEP_HEAP, StepWorker, fmt_ratio, machine, params  # noqa: E402
from hiertrans import cpu_kernels  # noqa: E402
from hiertrans.vit import create_model  # noqa: E402

ADAPTED = "pvt_v2_b0_adapted"


def build(model_name: str, classes: int, kernels: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if model_name.startswith("hvit"):
        model = create_model(model_name, num_classes=classes)
    elif model_name == ADAPTED:
        model = timm.create_model("pvt_v2_b0", num_classes=classes, sr_ratios=(2, 1, 1, 1))
    else:
        model = timm.create_model(model_name, num_classes=classes)
    return cpu_kernels.apply(model) if kernels else model


def make_step(model_name: str, mode: str, batch: int, img: int, classes: int, steps: int, channels_last: bool,
              device: str, kernels: bool = False, compile: bool = False) -> Callable[[], None]:
    """Runs in a worker process: `steps` training steps (forward, cross-entropy, backward, AdamW) or
    inference forwards (eval mode, `inference_mode`) on a fixed random batch; with `compile`, the model
    is `torch.compile`d (the untimed warm-up step compiles it)."""
    model = build(model_name, classes, kernels).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    if compile:
        model.compile()  # in place, the same for every model; eager otherwise

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


def forward_flops(model: nn.Module, img: int) -> float:
    """Forward FLOPs per image (matmuls, convs, attention), counted by torch's FlopCounterMode."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img, img))
    return counter.get_total_flops()


def measure(title: str, contenders: dict[str, str], batch: int, img: int, classes: int, steps: int,
            rounds: int, args: argparse.Namespace) -> None:
    """`contenders`: label -> model name, ours first. Each (model, mode) runs in its own worker process."""
    print(f"\n== {title}: {img}x{img} px, batch {batch}, {steps} steps x {rounds} rounds "
          f"(median), {classes} classes", flush=True)
    seconds: dict[tuple[str, str], list[float]] = {}
    memory: dict[tuple[str, str], int] = {}
    faulted: dict[tuple[str, str], float] = {}  # bytes page-faulted in per step
    for mode in ("train", "infer"):
        workers = {label: StepWorker(partial(make_step, name, mode, batch, img, classes, steps, args.channels_last,
                                             args.device, args.cpu_kernels, args.compile),
                                     args.device, args.threads or None, args.warmup,
                                     env=KEEP_HEAP if args.keep_heap else None)
                   for label, name in contenders.items()}
        for _ in range(rounds):
            for label, worker in workers.items():  # alternate: ours, theirs, ours, theirs, ...
                seconds.setdefault((label, mode), []).append(worker.time())
        for label, worker in workers.items():
            faulted[label, mode] = worker.faulted_bytes() / steps
            memory[label, mode] = worker.peak_memory()
            worker.close()

    def ips(label: str, mode: str) -> float:
        return batch * steps / statistics.median(seconds[label, mode])

    models = {label: build(name, classes) for label, name in contenders.items()}
    flops = {label: forward_flops(model, img) for label, model in models.items()}
    header = (f"{'model':<26}{'params':>9}{'GFLOPs/img':>11}{'train img/s':>13}{'infer img/s':>13}"
              f"{'train MiB':>11}{'infer MiB':>11}{'train faulted MiB/step':>24}")
    print(header)
    print("-" * len(header))
    for label, model in models.items():
        print(f"{label:<26}{params(model) / 1e6:>8.2f}M{flops[label] / 1e9:>11.3f}"
              f"{ips(label, 'train'):>13.1f}{ips(label, 'infer'):>13.1f}"
              f"{memory[label, 'train'] / 2**20:>11.0f}{memory[label, 'infer'] / 2**20:>11.0f}"
              f"{faulted[label, 'train'] / 2**20:>24.0f}")
    ours, *peers = models
    for theirs in peers:
        print(f"ours/{theirs.split()[0]}: params {fmt_ratio(params(models[ours]), params(models[theirs]))}, "
              f"FLOPs {fmt_ratio(flops[ours], flops[theirs])}, "
              f"train img/s {fmt_ratio(ips(ours, 'train'), ips(theirs, 'train'))}, "
              f"infer img/s {fmt_ratio(ips(ours, 'infer'), ips(theirs, 'infer'))}, "
              f"train memory {fmt_ratio(memory[ours, 'train'], memory[theirs, 'train'])}, "
              f"infer memory {fmt_ratio(memory[ours, 'infer'], memory[theirs, 'infer'])}")
    for mode in ("train", "infer"):  # the spread says how much to trust the medians
        spread = ", ".join(f"{label.split()[0]} " + "/".join(f"{batch * steps / s:.3g}" for s in seconds[label, mode])
                           for label in models)
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
    parser.add_argument("--cpu-kernels", action="store_true",
                        help="apply hiertrans.cpu_kernels to every model (the same swap on every side)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (compiled vs compiled)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="every model with glibc keeping freed memory (bench.common.KEEP_HEAP): no page "
                             "faults per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(machine())
    print(f"timm {timm.__version__}, device {args.device}, {args.threads or torch.get_num_threads()} threads, "
          f"channels_last={args.channels_last}, compile={args.compile}, cpu_kernels={args.cpu_kernels} "
          f"keep_heap={args.keep_heap} (every model alike), one process per model and mode")
    sizes = {int(s) for s in args.sizes.split(",")}
    if 32 in sizes:
        measure("CIFAR size", {"hvit_cifar": "hvit_cifar", ADAPTED: ADAPTED, "pvt_v2_b0 (stock)": "pvt_v2_b0"},
                args.batch_32, 32, 10, args.steps, args.rounds, args)
    if 224 in sizes:
        peers = {p: p for p in args.peers_224.split(",") if p}
        measure("ImageNet size", {"hvit_tiny (PVT v1 Tiny)": "hvit_tiny", **peers},
                args.batch_224, 224, 1000, args.steps_224, args.rounds_224, args)


if __name__ == "__main__":
    main()
