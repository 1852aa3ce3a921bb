"""Multi-process training: `ddp` on 2 CPU processes (gloo) through the CLI, exact distributed
validation, and the cluster launch scripts.

The `ddp` strategy relaunches `python -m hiertrans ...` for rank 1, so it runs in a subprocess;
one 2-process run (~30 s) serves every test here that needs it.
"""

import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, read_scalars
from helpers import TINY_LM_ARGS

TINY = [*TINY_LM_ARGS, "--model.init_args.sample_length=8", "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.05", "--data.init_args.test_fraction=0.05"]


def cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "hiertrans", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """`fit` on 2 processes for 3 steps; the last validation covers the whole (small) val split."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "corpus.txt").write_text(inspect.getsource(json) * 2)
    cli(tmp, "fit", "--config", "lm.yaml", *TINY, "--data.init_args.path=corpus.txt", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false")
    return tmp


def test_ddp_fit_writes_one_run_one_checkpoint_dir_one_config(ddp_run):
    runs = ddp_run / "runs" / "lm"
    assert [p.name for p in runs.iterdir()] == ["version_0"]  # rank 1 made no run of its own
    run = runs / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in run.rglob("checkpoints")] == ["checkpoints"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = (run / "config.yaml").read_text()
    assert re.search(r"devices: '?2'?\n", config) and "strategy: ddp" in config
    scalars = read_scalars(run)
    assert len(scalars["train/loss"]) == 3 and "val/bpb" in scalars


def test_two_process_validation_equals_one_process(ddp_run, tmp_path):
    """`ShardSampler` gives each window to exactly one rank and `val/bpb` is a byte-weighted mean
    synchronised over ranks: the 2-process figure logged at the end of the run equals a 1-process
    validation of the same weights."""
    import lightning.pytorch as pl

    from datamodules import ByteTextDataModule
    from lit_modules import LanguageModel

    two = read_scalars(ddp_run / "runs")["val/bpb"][-1]
    module = LanguageModel.load_from_checkpoint(ddp_run / "runs/lm/version_0/checkpoints/last.ckpt",
                                                weights_only=True)
    data = ByteTextDataModule(str(ddp_run / "corpus.txt"), seq_len=32, batch_size=4, val_fraction=0.05,
                              test_fraction=0.05)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    (one,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isclose(one["val/bpb"], two, rel_tol=1e-5), (one["val/bpb"], two)


def _sbatch_directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            for token in line.split()[1:]:
                key, _, value = token.partition("=")
                out[key] = value
    return out


def _cli_setting(text: str, key: str) -> str:
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    (value,) = re.findall(rf"--{re.escape(key)}[= ](\S+)", code)
    return value


def test_slurm_script_agrees_with_its_lightning_settings():
    text = (ROOT / "cluster" / "slurm.sbatch").read_text()
    sbatch = _sbatch_directives(text)
    gpus_per_node = int(sbatch["--gres"].rsplit(":", 1)[1])
    assert int(_cli_setting(text, "trainer.num_nodes")) == int(sbatch["--nodes"])
    assert int(_cli_setting(text, "trainer.devices")) == int(sbatch["--ntasks-per-node"]) == gpus_per_node
    assert _cli_setting(text, "trainer.strategy") == "ddp"
    assert sbatch["--signal"].startswith("SIGUSR1@") and "--requeue" in sbatch
    assert "SLURMEnvironment" in text and "auto_requeue=true" in text and "srun python -m hiertrans fit" in text


def test_torchrun_script_passes_matching_sizes():
    text = (ROOT / "cluster" / "torchrun.sh").read_text()
    assert '--nnodes="$NNODES"' in text and '--trainer.num_nodes="$NNODES"' in text
    assert '--nproc_per_node="$NPROC_PER_NODE"' in text and '--trainer.devices="$NPROC_PER_NODE"' in text
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / "torchrun.sh")]).returncode == 0


def test_image_evaluation_shards_every_image_once_and_accuracy_is_exact():
    """The ViT task under DDP: val/test/predict loaders use the no-padding `ShardSampler`, so the
    accuracy synchronised over 2 ranks (torchmetrics sums their states) is the 1-process figure."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchmetrics.classification import MulticlassAccuracy

    from datamodules import ImageDataModule
    from datamodules.text import ShardSampler
    from hiertrans import create_model

    data = ImageDataModule(root=None, batch_size=64)
    data.prepare_data()
    data.setup("fit")
    assert isinstance(data.val_dataloader().sampler, ShardSampler)
    val = data.val_dataset
    shards = [list(ShardSampler(val, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(val)))  # no image twice, none missing

    torch.manual_seed(0)
    model = create_model("hvit_cifar", num_classes=10, embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1),
                         depths=(1, 1, 1, 1), mlp_ratios=(1, 1, 1, 1)).eval()

    def accuracy(dataset) -> MulticlassAccuracy:
        metric = MulticlassAccuracy(10, average="micro")
        with torch.no_grad():
            for images, targets in DataLoader(dataset, batch_size=128):
                metric.update(model(images), targets)
        return metric

    one = accuracy(val).compute()
    rank0, rank1 = (accuracy(Subset(val, shard)) for shard in shards)
    rank0.merge_state(rank1)  # what the DDP sync does with the two ranks' states
    assert torch.equal(rank0.compute(), one)


def test_vit_ddp_fit_and_two_process_accuracy_equals_one_process(tmp_path):
    """The image task on 2 processes through the CLI: one run, and its synchronised val/acc is the
    accuracy a single process measures on the same weights (every validation image seen once)."""
    import lightning.pytorch as pl

    from datamodules import ImageDataModule
    from lit_modules import ImageClassifier

    cli(tmp_path, "fit", "--config", "vit.yaml", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.max_steps=3", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--model.init_args.log_attention_every_val=false")
    (run,) = (tmp_path / "runs" / "vit").iterdir()
    two = read_scalars(run)["val/acc"][-1]
    module = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    data = ImageDataModule(root=None, batch_size=64)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    (one,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isclose(one["val/acc"], two, abs_tol=1e-6), (one["val/acc"], two)
