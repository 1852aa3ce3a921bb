"""Does the hierarchy pay for itself? Hierarchical (1, 2) vs flat (1) at equal parameters and wall clock.

    python bench/lm_quality.py --minutes 10

Both models train with the same recipe (lm.yaml's optimiser, batch and sequence length) on the
default corpus (the standard library's source) for the same wall-clock budget, one after the
other, then each is evaluated on the same validation split: val/bpb over every byte of it.
The flat model gets its parameters back as depth, so both have (within a few %) the same count.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import params  # noqa: E402
from datamodules import ByteTextDataModule  # noqa: E402
from lit_modules import LanguageModel  # noqa: E402

COMMON = dict(dim=192, seq_len=256, heads=4, dim_head=48, lr=2e-3, warmup_steps=100, sample_length=0)
HIERARCHICAL = dict(COMMON, depth=4, hierarchies=(1, 2), window_sizes=(32, None))
FLAT = dict(COMMON, depth=11, hierarchies=1, window_sizes=32, recon_loss_weight=0.0, hierarchical_ar_loss_weight=0.0)


def train(name: str, config: dict, minutes: float, args) -> dict:
    pl.seed_everything(0)
    data = ByteTextDataModule(seq_len=256, batch_size=16, val_fraction=args.val_fraction,
                              test_fraction=args.val_fraction, train_samples_per_epoch=10**7)
    module = LanguageModel(**config)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_time={"minutes": minutes},
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    (result,) = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False).validate(module, datamodule=data, verbose=False)
    return dict(name=name, params=params(module.model), steps=trainer.global_step, seconds=seconds,
                bpb=result["val/bpb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per model")
    parser.add_argument("--val-fraction", type=float, default=0.005)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.minutes} min per model")
    results = []
    for name, config in (("hierarchical (1, 2)", HIERARCHICAL), ("flat (1)", FLAT)):
        results.append(train(name, config, args.minutes, args))
    print(f"\n{'model':<22}{'params':>12}{'steps':>8}{'tokens/s':>10}{'val bpb':>9}")
    for r in results:
        tokens_per_sec = r["steps"] * 16 * 256 / r["seconds"]
        print(f"{r['name']:<22}{r['params']:>12,}{r['steps']:>8}{tokens_per_sec:>10.0f}{r['bpb']:>9.3f}")
    winner = min(results, key=lambda r: r["bpb"])
    print(f"lower val bpb at equal wall clock: {winner['name']}")


if __name__ == "__main__":
    main()
