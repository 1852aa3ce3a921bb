"""CIFAR-10 at an equal CPU-time budget: hvit_cifar vs timm's pvt_v2_b0 (adapted to 32 px, and stock),
same recipe, several seeds; choices made on a selection split, figures reported on another.

    python bench/vit_cifar10.py --split report --seeds 0 1 2                   # the table: 30 CPU-min each
    python bench/vit_cifar10.py --split select --cpu-minutes 8 --models A B    # a screen, for choosing
    python bench/vit_cifar10.py --cpu-minutes 1 --seeds 0                      # a smoke run

Data: `../shared/data/cifar10-train.tar.gz` (the 50,000 CIFAR-10 training images), unpacked once into
the hiertrans cache (never the repository). Two disjoint stratified 5,000-image sets are carved from it:
`select` (the hold-out earlier sessions chose hvit_cifar's design on) and `report` (never used for any
choice). `--split report` trains on the other 45,000 images and reports on `report`; `--split select`
trains on the 40,000 in neither set and scores on `select`. The splits are symlink folders in the cache.

Budget: CPU seconds of the training process (`time.process_time`: data, forward, backward, optimizer),
not wall clock, so a machine shared with other jobs slows a run down without shortening its training.
The LR warm-up + cosine schedule runs over that budget, so every model ends its schedule exactly when
its budget is spent, however fast it is. Models run at the same time, each in its own process with
one thread; seeds one after another. Images are decoded once into memory (`in_memory=True`: crops,
flips and normalisation per batch). Recipe, the same for all: AdamW lr 2e-3, weight decay 0.05 (not on
norms/biases/position embeddings), batch 128, label smoothing 0.1, stochastic depth 0.1, random-
resized crops (50-100%) and flips; no RandAugment/mixup, which pay off over hundreds of epochs.
Printed per run: images seen, epochs, CPU and wall seconds, accuracy on the scored split; per model:
mean and spread over the seeds.

Peers: `pvt_v2_b0` as timm ships it (spatial reduction 8, 4, 2, 1: at 32 px its 8x8, 4x4 and 2x2 maps
are pooled to a single key in stages 1-3) and `pvt_v2_b0_adapted`, the same model with reduction
(2, 1, 1, 1) as hvit_cifar uses, the sensible configuration for 32 px inputs.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from bench.common import machine, params  # noqa: E402
from datamodules.images import HViTDataset, ImageDataModule, stratified_split  # noqa: E402
from hiertrans.io import atomic_directory, cache_dir  # noqa: E402
from hiertrans.optim import warmup_cosine  # noqa: E402
from hiertrans.vit import preset, timm_model  # noqa: E402
from lit_modules import ImageClassifier  # noqa: E402

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"
MODELS = {
    "hvit_cifar": lambda: preset("hvit_cifar", num_classes=10, drop_path_rate=0.1),
    "pvt_v2_b0": lambda: timm_model("pvt_v2_b0", num_classes=10, drop_path_rate=0.1),
    "pvt_v2_b0_adapted": lambda: timm_model("pvt_v2_b0", num_classes=10, drop_path_rate=0.1,
                                            kwargs={"sr_ratios": (2, 1, 1, 1)}),
}
SPLIT_SIZE = 5000


def unpack_once(archive: Path) -> Path:
    """Extract `archive` (an image folder `train/<class>/*.jpg`) into the cache, once; return its root."""
    if not archive.is_file():
        raise SystemExit(f"no CIFAR-10 archive at {archive}; pass --data PATH")
    final = cache_dir() / f"cifar10-{hashlib.sha256(archive.read_bytes()).hexdigest()[:12]}"
    with atomic_directory(final) as tmp:
        if tmp is not None:
            print(f"unpacking {archive} -> {final} (once)", flush=True)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
    return final


def split_folders(root: Path) -> Path:
    """`<root>-splits/{report,select}/{train,val}/<class>/` as symlinks into `root/train`, built once.

    `select`: the stratified 10% (seed 0) earlier sessions held out and chose on. `report`: a
    stratified 5,000 of the rest (seed 1), disjoint from `select`, never used for a choice.
    """
    final = root.parent / f"{root.name}-splits"
    with atomic_directory(final) as tmp:
        if tmp is None:
            return final
        images = HViTDataset(root, split="train")
        targets = images.targets
        rest, select = stratified_split(targets, SPLIT_SIZE / len(targets), seed=0)
        keep, report = stratified_split([targets[i] for i in rest], SPLIT_SIZE / len(rest), seed=1)
        report = [rest[i] for i in report]
        sets = {"report": {"train": sorted(set(range(len(targets))) - set(report)), "val": report},
                "select": {"train": sorted(set(range(len(targets))) - set(report) - set(select)), "val": select}}
        for split, parts in sets.items():
            for part, indices in parts.items():
                for i in indices:
                    path, label = images.samples[i]
                    link = tmp / split / part / images.classes[label] / Path(path).name
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(path, link)
    return final


class CpuBudget(Callback):
    """End training after `seconds` of this process's CPU time, with the LR set at every step from
    warm-up + cosine over the budget; counts images and wall seconds."""

    def __init__(self, seconds: float, lr: float, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01):
        self.seconds, self.lr, self.warmup_fraction, self.min_lr_ratio = seconds, lr, warmup_fraction, min_lr_ratio
        self.images, self.cpu, self.wall, self.last_print = 0, 0.0, 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        resolution = 10_000  # elapsed CPU time as steps of a fixed-length schedule
        progress = min(resolution, int(resolution * (time.process_time() - self.cpu_start) / self.seconds))
        factor = warmup_cosine(progress, round(self.warmup_fraction * resolution), resolution, self.min_lr_ratio)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = self.lr * factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += batch[0].shape[0]
        self.cpu, self.wall = time.process_time() - self.cpu_start, time.perf_counter() - self.wall_start
        if self.cpu >= self.seconds:
            trainer.should_stop = True
        if self.wall - self.last_print >= 120:
            self.last_print = self.wall
            print(f"  [{type(pl_module.net).__name__}] cpu {self.cpu / 60:5.1f} min  wall {self.wall / 60:5.1f} min  "
                  f"step {trainer.global_step:6d}  loss {float(outputs['loss']):.3f}", flush=True)


def run(name: str, seed: int, root: Path, args) -> dict:
    """One model, one seed: train on the split's train folder within the CPU budget, score its val folder."""
    seed_everything(seed, verbose=False)
    data = ImageDataModule(str(root), img_size=32, batch_size=args.batch_size, num_workers=0, in_memory=True,
                           seed=seed, random_resized_crop=True, crop_scale=tuple(args.crop_scale), hflip=True,
                           mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    net = MODELS[name]()
    module = ImageClassifier(net, optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.05),
                             scheduler=None, label_smoothing=0.1, log_attention_every_val=False)
    budget = CpuBudget(args.cpu_minutes * 60, args.lr)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[budget])
    print(f"{name} seed {seed}: {params(net) / 1e6:.2f}M params, {args.cpu_minutes:g} CPU-min on {args.split}",
          flush=True)
    trainer.fit(module, data)
    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = evaluator.validate(module, data, verbose=False)[0]
    return {"model": name, "seed": seed, "params_M": round(params(net) / 1e6, 3), "images_seen": budget.images,
            "epochs": round(budget.images / len(data.train_dataset), 2), "cpu_seconds": round(budget.cpu, 1),
            "wall_seconds": round(budget.wall, 1), "images_per_cpu_sec": round(budget.images / budget.cpu, 1),
            "acc": round(metrics["val/acc"], 4), "loss": round(metrics["val/loss"], 4)}


def run_concurrently(seed: int, args) -> list[dict]:
    """One subprocess per model, started together (one thread each); their results in `args.models` order."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name in args.models:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", "--models", name, "--seeds", str(seed), "--json", str(out),
                   "--data", str(args.data), "--split", args.split, "--cpu-minutes", str(args.cpu_minutes),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads", str(args.threads),
                   "--crop-scale", *map(str, args.crop_scale)]
            jobs.append((name, subprocess.Popen(cmd), out))
        for _, job, _ in jobs:
            job.wait()
        failed = [name for name, job, _ in jobs if job.returncode != 0]
        if failed:
            raise SystemExit(f"training failed for {failed}")
        return [json.loads(out.read_text())[0] for _, _, out in jobs]


def summary(results: list[dict], args) -> None:
    sizes = "45k train / 5k report" if args.split == "report" else "40k train / 5k select"
    print(f"\nCIFAR-10 {args.split} split ({sizes}), {args.cpu_minutes:g} CPU-minutes per run, batch "
          f"{args.batch_size}, lr {args.lr:g}, crop scale {args.crop_scale[0]:g}-{args.crop_scale[1]:g}, "
          f"{args.threads} thread(s) per model")
    print(f"{'model':<19}{'seed':>5}{'params':>8}{'images':>10}{'epochs':>7}{'CPU s':>7}{'wall s':>8}{'img/CPU-s':>10}"
          f"{'acc':>8}")
    for r in results:
        print(f"{r['model']:<19}{r['seed']:>5}{r['params_M']:>7.2f}M{r['images_seen']:>10,}{r['epochs']:>7.2f}"
              f"{r['cpu_seconds']:>7.0f}{r['wall_seconds']:>8.0f}{r['images_per_cpu_sec']:>10.1f}{r['acc']:>8.4f}")
    print(f"\n{'model':<19}{'runs':>5}{'mean acc':>10}{'std':>8}{'min':>8}{'max':>8}{'mean images':>13}")
    for name in args.models:
        accs = [r["acc"] for r in results if r["model"] == name]
        images = statistics.mean(r["images_seen"] for r in results if r["model"] == name)
        std = statistics.stdev(accs) if len(accs) > 1 else math.nan
        print(f"{name:<19}{len(accs):>5}{statistics.mean(accs):>10.4f}{std:>8.4f}{min(accs):>8.4f}{max(accs):>8.4f}"
              f"{images:>13,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("report", "select"), default="report")
    parser.add_argument("--cpu-minutes", type=float, default=30.0, help="training CPU time per model and seed")
    parser.add_argument("--models", nargs="+", default=["hvit_cifar", "pvt_v2_b0_adapted", "pvt_v2_b0"],
                        choices=sorted(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="cifar10-train.tar.gz")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.5, 1.0], metavar=("LO", "HI"),
                        help="area fractions of the random-resized crops")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per model")
    parser.add_argument("--sequential", action="store_true", help="train the models one after the other")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one model of a concurrent run
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = split_folders(unpack_once(args.data)) / args.split
    if args.child:
        results = [run(args.models[0], seed, root, args) for seed in args.seeds]
    else:
        print(machine(), flush=True)
        results = []
        for seed in args.seeds:
            if args.sequential or len(args.models) == 1:
                results += [run(name, seed, root, args) for name in args.models]
            else:
                results += run_concurrently(seed, args)
            if args.json:  # after every seed: a long run interrupted keeps what it finished
                args.json.write_text(json.dumps(results, indent=2))
        summary(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
