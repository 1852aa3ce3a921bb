"""The image task resumes exactly: 5 steps, an interruption (a clean stop, SIGTERM, SIGKILL), then a resume
to step 9 ends with the weights, EMA and optimizer state of 9 uninterrupted steps, bit for bit, with
per-image augmentation (crops, flips, RandAugment, erasing), mixup/cutmix, drop-path, an EMA (`ema_decay`)
and two loader workers (which worker decodes which batch changes with the resume).

Every run is `hiertrans.cli.main` in this process (no imports to pay) except the SIGKILL one, which is
forked so that it can be killed.
"""

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_in_process
from test_faults import wait_for

STEPS, STOP = 9, 5
VIT_TINY = [f"--model.init_args.net.init_args.{k}" for k in (
    "embed_dims=[16,16,32,32]", "num_heads=[1,1,2,2]", "depths=[1,1,1,1]", "mlp_ratios=[2,2,2,2]")]
ARGS = [*VIT_TINY, "--model.init_args.net.init_args.drop_path_rate=0.2",  # random inside the network too
        "--model.init_args.ema_decay=0.9",  # lit_modules.EMA (warm-up), added by the task after SaveOnSigterm
        "--model.init_args.log_attention_every_val=false",
        f"--model.init_args.scheduler.init_args.total_steps={STEPS}",  # the same schedule whatever max_steps is
        "--data.init_args.num_workers=2", "--data.init_args.batch_size=16", "--data.init_args.random_resized_crop=true",
        "--data.init_args.hflip=true", "--data.init_args.randaugment=true", "--data.init_args.random_erasing=0.5",
        "--data.init_args.mixup_alpha=0.8", "--data.init_args.cutmix_alpha=1.0",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.deterministic=true"]


def callbacks_yaml(extra: str = "") -> str:
    lines = ["trainer:", "  callbacks:",
             "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint",
             "      init_args: {every_n_train_steps: 1, save_last: true, save_top_k: 0}",  # last.ckpt every step
             "    - class_path: lit_modules.ValidateAtEnd"]
    if extra == "pause":  # waits at the start of step STOP + 1, after the checkpoint of step STOP
        lines += ["    - class_path: test_faults.PauseAt", f"      init_args: {{step: {STOP}, marker: paused}}"]
    elif extra == "sigterm":  # SIGTERM during step STOP: last.ckpt right after it
        lines += ["    - class_path: test_faults.SigtermSelfAt", f"      init_args: {{step: {STOP - 1}}}"]
    return "\n".join(lines) + "\n"


def fit(cwd: Path, *args: str) -> int:
    """`python -m hiertrans fit --config vit.yaml ...` in this process, one thread; returns the exit code."""
    return cli_in_process(cwd, "fit", "--config", "vit.yaml", *args)


def _killable_run(cwd: Path, args: list[str]) -> None:
    code = fit(cwd, *args)
    sys.stdout.flush()
    os._exit(code)


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "runs/vit/version_0/checkpoints/last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, extra in (("reference", ""), ("stopped", ""), ("sigterm", "sigterm"), ("sigkill", "pause")):
        dirs[name] = tmp_path_factory.mktemp(name)
        (dirs[name] / "run.yaml").write_text(callbacks_yaml(extra))
        (dirs[name] / "resume.yaml").write_text(callbacks_yaml())
    common = ["--config", "run.yaml", *ARGS]
    resume = ["--config", "resume.yaml", *ARGS, f"--trainer.max_steps={STEPS}", "--ckpt_path", "last"]

    # SIGKILL: a forked run (no imports to pay) killed while it waits at step STOP + 1
    killed = multiprocessing.get_context("fork").Process(
        target=_killable_run, args=(dirs["sigkill"], [*common, f"--trainer.max_steps={STEPS}"]))
    killed.start()
    try:
        assert fit(dirs["reference"], *common, f"--trainer.max_steps={STEPS}") == 0
        wait_for(dirs["sigkill"] / "paused.0", killed)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.join(60)
    assert killed.exitcode == -signal.SIGKILL
    assert last(dirs["sigkill"])["global_step"] == STOP  # the periodic checkpoint
    assert fit(dirs["stopped"], *common, f"--trainer.max_steps={STOP}") == 0
    assert fit(dirs["sigterm"], *common, f"--trainer.max_steps={STEPS}") == 128 + signal.SIGTERM
    for name in ("stopped", "sigterm"):
        assert last(dirs[name])["global_step"] == STOP
    for name in ("stopped", "sigterm", "sigkill"):
        assert fit(dirs[name], *resume) == 0
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stopped", "sigterm", "sigkill"])
def test_mid_epoch_resume_ends_bit_identical_to_an_uninterrupted_run(runs, name):
    reference, resumed = last(runs["reference"]), last(runs[name])
    assert reference["global_step"] == resumed["global_step"] == STEPS
    assert reference["epoch"] == resumed["epoch"] == 0  # 1,437 images in batches of 16: mid-epoch throughout
    # the EMA callback saves the averaged weights as state_dict, the trained ones beside them
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert reference[key].keys() == resumed[key].keys()
        for name_, value in reference[key].items():
            torch.testing.assert_close(resumed[key][name_], value, rtol=0, atol=0, msg=f"{key}: {name_}")
    torch.testing.assert_close([s["state"] for s in resumed["optimizer_states"]],
                               [s["state"] for s in reference["optimizer_states"]], rtol=0, atol=0)
    assert not torch.equal(reference["state_dict"]["net.head.weight"],
                           reference["current_model_state"]["net.head.weight"])  # the EMA is not the weights
    assert [p.name for p in (runs[name] / "runs/vit").iterdir()] == ["version_0"]


def test_training_order_and_augmentation_are_functions_of_seed_epoch_and_index(tmp_path):
    """What the exact resume rests on, without a trainer: the sampler's shards and mid-epoch start, and
    items (and mixup batches) that do not depend on the process or the global RNG state."""
    from datamodules.images import EpochShuffleSampler, ImageDataModule, SeededCollate, SeededItems

    data = list(range(10))
    shards = [list(EpochShuffleSampler(data, seed=3, epoch=1, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(i for shard in shards for _, i in shard) == data and all(e == 1 for s in shards for e, _ in s)
    assert list(EpochShuffleSampler(data, seed=3, epoch=2, num_replicas=1, rank=0)) != list(
        EpochShuffleSampler(data, seed=3, epoch=1, num_replicas=1, rank=0))  # a new order every epoch
    resumed = EpochShuffleSampler(data, seed=3, epoch=1, start=2, num_replicas=2, rank=1)
    assert list(resumed) == shards[1][2:] + shards[1][:2] and len(resumed) == 5
    resumed.set_epoch(2)  # the next epoch starts at its beginning
    assert list(resumed) == list(EpochShuffleSampler(data, seed=3, epoch=2, num_replicas=2, rank=1))
    assert len(EpochShuffleSampler(list(range(7)), num_replicas=2, rank=1)) == 4  # padded to equal shards

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            from PIL import Image

            Image.new("RGB", (12, 12), (40 * i, 100, 200 if c == "a" else 20)).save(root / "train" / c / f"{i}.png")
    dm = ImageDataModule(str(root), img_size=8, val_fraction=0.25, random_resized_crop=True, hflip=True,
                         randaugment=True, random_erasing=0.5, mixup_alpha=0.5)
    dm.setup("fit")
    items = SeededItems(dm.train_dataset, seed=0)
    torch.manual_seed(123)
    first = items[(4, 2)]
    torch.manual_seed(456)  # another global RNG state: the same item
    again, other_epoch = items[(4, 2)], items[(5, 2)]
    assert torch.equal(first[0], again[0]) and first[2] == again[2]
    assert not torch.equal(first[0], other_epoch[0])
    state = torch.get_rng_state()
    images, targets = SeededCollate(dm.mix)([items[(0, i)] for i in range(4)])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    again_images, again_targets = SeededCollate(dm.mix)([items[(0, i)] for i in range(4)])
    assert torch.equal(images, again_images) and torch.equal(targets, again_targets) and targets.ndim == 2
