"""CIFAR-10 at equal wall clock: our hvit_cifar vs timm's pvt_v2_b0, same recipe, same budget.

    python bench/vit_cifar10.py                   # 30 minutes of training, both models at once
    python bench/vit_cifar10.py --minutes 1       # a smoke run

Data: `../shared/data/cifar10-train.tar.gz` (50,000 JPEGs), unpacked once into the hiertrans cache
(`$HIERTRANS_CACHE`, never the repository); 45,000 train / 5,000 validation images, carved by the
datamodule (stratified, seed 0) and decoded once into memory (`in_memory=True`: crops, flips and
normalisation run per batch, so JPEG decoding does not eat the training budget). The models train
at the same time, each in its own process with one thread, so they share the machine and whatever
else it is doing equally (`--sequential` runs them one after the other instead). Each model
trains for `--minutes` of wall clock (Lightning's `max_time`), with the LR warm-up + cosine schedule
laid over that wall-clock budget rather than a step count, so each model ends its schedule exactly
when its time is up however fast it runs. Then both are validated on the same 5,000 images (not
counted in the budget). Recipe: AdamW lr 2e-3, weight decay 0.05 (not on norms/biases/position
embeddings), batch 128, label smoothing 0.1, stochastic depth 0.1, random-resized crops (50-100%)
and flips; no RandAugment/mixup, which pay off only over
hundreds of epochs. Images seen is part of the result.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from bench.common import params  # noqa: E402
from datamodules.images import ImageDataModule, cache_dir  # noqa: E402
from hiertrans.optim import warmup_cosine  # noqa: E402
from lit_modules.classifier import ImageClassifier  # noqa: E402

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.tar.gz"


def unpack_once(archive: Path) -> Path:
    """Extract `archive` (an image folder `train/<class>/*.jpg`) into the cache; return its root.

    The directory is named by the archive's hash and moved into place with one `os.replace`, so an
    interrupted extraction never leaves a half-written folder behind.
    """
    if not archive.is_file():
        raise SystemExit(f"no CIFAR-10 archive at {archive}; pass --data PATH")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    final = cache_dir() / f"cifar10-{digest}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-tmp-", dir=final.parent))
    try:
        print(f"unpacking {archive} -> {final} (once)", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class WallClockSchedule:
    """LR multiplier as a function of elapsed wall clock: warm-up + cosine over `seconds`."""

    def __init__(self, seconds: float, warmup_fraction: float, min_lr_ratio: float) -> None:
        self.seconds, self.warmup_fraction, self.min_lr_ratio = seconds, warmup_fraction, min_lr_ratio
        self.start: float | None = None

    def __call__(self, step: int) -> float:
        if self.start is None:
            self.start = time.perf_counter()
        resolution = 10_000  # express elapsed time as steps of a fixed-length schedule
        progress = int(resolution * (time.perf_counter() - self.start) / self.seconds)
        warmup = round(self.warmup_fraction * resolution)
        return warmup_cosine(progress, warmup, resolution, self.min_lr_ratio)


class Budget(Callback):
    """Replace the step-based LR schedule by `WallClockSchedule`; count images; print progress."""

    def __init__(self, seconds: float, warmup_fraction: float, min_lr_ratio: float) -> None:
        self.schedule = WallClockSchedule(seconds, warmup_fraction, min_lr_ratio)
        self.last_print, self.images, self.seconds = 0.0, 0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.schedule.start = time.perf_counter()
        for config in trainer.lr_scheduler_configs:
            config.scheduler.lr_lambdas = [self.schedule] * len(config.scheduler.lr_lambdas)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += batch[0].shape[0]
        now = time.perf_counter()
        if now - self.last_print >= 60:
            self.last_print = now
            elapsed = now - self.schedule.start
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(f"  {elapsed / 60:5.1f} min  step {trainer.global_step:6d}  loss {loss:.3f}  "
                  f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.schedule.start


def run(model_name: str, root: Path, args) -> dict:
    seed_everything(0, verbose=False)
    data = ImageDataModule(str(root), img_size=32, batch_size=args.batch_size, num_workers=0, in_memory=True,
                           val_fraction=0.1, seed=0, random_resized_crop=True, crop_scale=(0.5, 1.0),
                           hflip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    module = ImageClassifier(model_name=model_name, num_classes=10, img_size=32, drop_path_rate=0.1, lr=2e-3,
                             weight_decay=0.05, warmup_fraction=0.05, min_lr_ratio=0.01, label_smoothing=0.1,
                             log_attention_every_val=False)
    seconds = args.minutes * 60
    budget = Budget(seconds, warmup_fraction=0.05, min_lr_ratio=0.01)
    # max_epochs only sizes the (replaced) step schedule; max_time ends the run
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=10_000, max_time=timedelta(seconds=seconds),
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[budget])
    print(f"{model_name}: {params(module.model) / 1e6:.2f}M params, training for {args.minutes:g} min",
          flush=True)
    trainer.fit(module, data)
    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = evaluator.validate(module, data, verbose=False)[0]
    images = budget.images
    return {"model": model_name, "params_M": round(params(module.model) / 1e6, 3), "images_seen": images,
            "epochs": round(images / len(data.train_dataset), 2), "train_seconds": round(budget.seconds, 1),
            "images_per_sec": round(images / budget.seconds, 1), "val_acc": round(metrics["val/acc"], 4),
            "val_loss": round(metrics["val/loss"], 4), "val_f1": round(metrics["val/f1"], 4)}


def run_concurrently(root: Path, args) -> list[dict]:
    """One subprocess per model, all started together; their JSON results, in `args.models` order."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name in args.models:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--models", name, "--json", str(out), "--data", str(args.data),
                   "--minutes", str(args.minutes), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--child"]
            jobs.append((subprocess.Popen(cmd), out))
        for job, _ in jobs:
            job.wait()
        failed = [name for name, (job, _) in zip(args.models, jobs) if job.returncode != 0]
        if failed:
            raise SystemExit(f"training failed for {failed}")
        return [json.loads(out.read_text())[0] for _, out in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall clock per model")
    parser.add_argument("--models", nargs="+", default=["hvit_cifar", "pvt_v2_b0"])
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="cifar10-train.tar.gz")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per model")
    parser.add_argument("--sequential", action="store_true", help="train the models one after the other")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one model of a concurrent run
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = unpack_once(args.data)
    if len(args.models) == 1 or args.sequential:
        results = [run(name, root, args) for name in args.models]
    else:
        results = run_concurrently(root, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.child:
        return
    how = "one after the other" if args.sequential else "at the same time"
    print(f"\nCIFAR-10, 45k train / 5k val, {args.minutes:g} min of training each ({how}), "
          f"batch {args.batch_size}, {args.threads} thread(s) per model")
    print(f"{'model':<12} {'params':>8} {'images seen':>12} {'epochs':>7} {'img/s':>7} {'val acc':>8} "
          f"{'val loss':>9}")
    for r in results:
        print(f"{r['model']:<12} {r['params_M']:>7.2f}M {r['images_seen']:>12,} {r['epochs']:>7.2f} "
              f"{r['images_per_sec']:>7.1f} {r['val_acc']:>8.4f} {r['val_loss']:>9.4f}")


if __name__ == "__main__":
    main()
