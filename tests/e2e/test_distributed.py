"""Multi-process training on 2 CPU processes (gloo): `ddp` and `fsdp2` through the CLI, exact distributed
validation, SIGTERM to every rank at once, and the cluster launch scripts.

The LM's `ddp` run goes through Lightning's launcher (`python -m hiertrans` relaunched for rank 1, in a
subprocess, ~30 s). The other runs start their ranks the way torchrun and srun do, every rank a process
with its rank in the environment and no launcher (`run_ranks`), forked from the test process so that
they pay no imports (~5 s each).
"""

import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, read_scalars
from helpers import TINY_LM_ARGS
from test_resume_images import VIT_TINY

STEPS, STOP = 4, 2  # the LM: 2 steps per epoch (16 crops, 2 ranks x 4); the images: mid-epoch throughout
TINY = [*TINY_LM_ARGS, "--model.init_args.sample_length=8", "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.06", "--data.init_args.test_fraction=0.05",  # 53 val windows: odd
        "--data.init_args.train_samples_per_epoch=16", f"--model.init_args.scheduler.init_args.total_steps={STEPS}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.log_every_n_steps=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]
# 1,150 train / 287 val digits (odd: padding to equal shards would count an image twice), an EMA, a worker per rank
VIT = [*VIT_TINY, "--model.init_args.log_attention_every_val=false",
       f"--model.init_args.scheduler.init_args.total_steps={STEPS}", "--data.init_args.val_split=null",
       "--data.init_args.val_fraction=0.2", "--data.init_args.num_workers=1",
       "--data.init_args.random_resized_crop=true", "--trainer.accelerator=cpu", "--trainer.devices=2",
       "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
       "--trainer.enable_model_summary=false",
       "--trainer.callbacks+=test_distributed.RecordDecayGroups"]
EMA = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay=0.9"]


def cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "hiertrans", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _rank(cwd: str, args: list[str], rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), OMP_NUM_THREADS="1")
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from hiertrans.cli import main

    rank_zero_only.rank = rank  # what importing Lightning with RANK set would have made it
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(cwd: Path, *args: str, world_size: int = 2, timeout: float = 240) -> list[int]:
    """`python -m hiertrans <args>` as `world_size` ranks started like torchrun/srun start them (MASTER_ADDR,
    WORLD_SIZE, RANK, LOCAL_RANK in each one's environment; Lightning launches nothing), forked from this
    process. Returns the exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_rank, args=(str(cwd), list(args), r, world_size, port)) for r in range(world_size)]
    for rank in ranks:
        rank.start()
    deadline = time.monotonic() + timeout
    for rank in ranks:
        rank.join(max(0.0, deadline - time.monotonic()))
    for rank in ranks:
        if rank.is_alive():  # a hang: fail, not wait forever
            rank.kill()
            rank.join()
    return [rank.exitcode for rank in ranks]


class RecordDecayGroups(pl.Callback):
    """Test helper: each rank writes its optimizer's groups (parameter names, weight decay, whether the
    parameters are sharded DTensors) to `decay_groups.<rank>.json` when training starts."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = {g["name"]: {"weight_decay": g["weight_decay"], "params": sorted(names[id(p)] for p in g["params"]),
                              "sharded": all(isinstance(p, DTensor) for p in g["params"])}
                  for g in trainer.optimizers[0].param_groups}
        Path(f"decay_groups.{trainer.global_rank}.json").write_text(json.dumps(groups))


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """`{step: value}` of a scalar over every event file under `run_dir` (an interrupted and resumed run
    writes two)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for event_file in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def weights(path: Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    """`key` of a checkpoint file, or of a distributed checkpoint directory (converted to one file first)."""
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, path.with_suffix(".full"))
        return torch.load(path.with_suffix(".full"), weights_only=True)[key]
    return torch.load(path, weights_only=True)[key]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# ---------------------------------------------------------------------------------------------
# the language model


LM = ["fit", "--config", "lm.yaml", *TINY, "--data.init_args.path=corpus.txt"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """`fit` on 2 processes through Lightning's ddp launcher, 2 steps (one epoch) and a validation of the
    whole (small) val split."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "corpus.txt").write_text(inspect.getsource(json) * 2)
    cli(tmp, *LM, "--trainer.strategy=ddp", f"--trainer.max_steps={STOP}")
    return tmp


@pytest.fixture(scope="module")
def ddp_resumed(ddp_run, tmp_path_factory) -> Path:
    """A copy of `ddp_run` continued with `--ckpt_path last` to step 4 (ranks started torchrun-style)."""
    tmp = tmp_path_factory.mktemp("ddp_resumed")
    shutil.copytree(ddp_run, tmp, dirs_exist_ok=True)
    resume = [f"--trainer.max_steps={STEPS}", "--ckpt_path", "last"]
    assert run_ranks(tmp, *LM, "--trainer.strategy=ddp", *resume) == [0, 0]
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
    scalars_ = read_scalars(run)
    assert len(scalars_["train/loss"]) == STOP and "val/bpb" in scalars_


def test_two_process_validation_equals_one_process(ddp_resumed, tmp_path):
    """`ShardSampler` gives each window to exactly one rank and `val/bpb` is a byte-weighted mean
    synchronised over ranks: the 2-process figure logged at the end of the run equals a 1-process
    validation of the same weights. The split (53 windows) does not divide by 2 and the model is better
    than chance, so a padded or duplicated window would change the figure."""
    from datamodules import ByteTextDataModule
    from lit_modules import LanguageModel

    two = scalars(ddp_resumed / "runs", "val/bpb")
    two = two[max(two)]  # the last validation
    module = LanguageModel.load_from_checkpoint(ddp_resumed / "runs/lm/version_0/checkpoints/last.ckpt",
                                                weights_only=True)
    data = ByteTextDataModule(str(ddp_resumed / "corpus.txt"), seq_len=32, batch_size=4, val_fraction=0.06,
                              test_fraction=0.05)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    (one,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isclose(one["val/bpb"], two, rel_tol=1e-5), (one["val/bpb"], two)

    windows = data.val_set
    assert len(windows) % 2 == 1 and one["val/bpb"] < 8.0  # uniform guessing is 8 bits per byte
    with torch.no_grad():  # the figure with window 0 counted twice (what DistributedSampler's padding does)
        per_window = [module.losses(windows[i][None])[1] * (windows[i][1:] >= 0).sum() for i in range(len(windows))]
    counts = [int((windows[i][1:] >= 0).sum()) for i in range(len(windows))]
    padded = (sum(per_window) + per_window[0]) / (sum(counts) + counts[0]) / math.log(2)
    assert abs(float(padded) - one["val/bpb"]) > 100 * 1e-5 * one["val/bpb"]


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory) -> Path:
    """The same 4 steps on 2 ddp ranks without a stop."""
    tmp = tmp_path_factory.mktemp("ddp_uninterrupted")
    (tmp / "corpus.txt").write_text(inspect.getsource(json) * 2)
    assert run_ranks(tmp, *LM, "--trainer.strategy=ddp", f"--trainer.max_steps={STEPS}") == [0, 0]
    return tmp


@pytest.mark.slow
def test_ddp_lm_resumed_at_an_epoch_end_ends_as_an_uninterrupted_run(ddp_resumed, ddp_uninterrupted):
    """Stopped after epoch 0's last step and resumed under ddp, the LM trains on the same crops in the same
    order as a run never stopped: the same losses and bit-identical final weights."""
    assert scalars(ddp_resumed / "runs", "train/loss") == scalars(ddp_uninterrupted / "runs", "train/loss")
    assert_same_weights(weights(ddp_resumed / "runs/lm/version_0/checkpoints/last.ckpt"),
                        weights(ddp_uninterrupted / "runs/lm/version_0/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def lm_fsdp2(tmp_path_factory) -> Path:
    """The same training under fsdp2: 1 step (mid-epoch), stop, then `--ckpt_path last` to step 4."""
    tmp = tmp_path_factory.mktemp("lm_fsdp2")
    (tmp / "corpus.txt").write_text(inspect.getsource(json) * 2)
    args = [*LM, "--trainer.strategy=fsdp2", "--trainer.callbacks+=test_distributed.RecordDecayGroups"]
    assert run_ranks(tmp, *args, "--trainer.max_steps=1") == [0, 0]
    assert torch.load(tmp / "runs/lm/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
    assert run_ranks(tmp, *args, f"--trainer.max_steps={STEPS}", "--ckpt_path", "last") == [0, 0]
    return tmp


@pytest.mark.slow
def test_fsdp2_lm_trains_checkpoints_and_resumes_as_ddp(ddp_uninterrupted, lm_fsdp2):
    """Per-block FSDP2 shards on 2 processes, stopped mid-epoch and resumed from the checkpoint (a full
    file: the default), give an uninterrupted DDP run's losses (1e-5) step by step and end with its
    weights."""
    fsdp2, ddp = scalars(lm_fsdp2 / "runs", "train/loss"), scalars(ddp_uninterrupted / "runs", "train/loss")
    assert len(fsdp2) == len(ddp) == STEPS and fsdp2.keys() == ddp.keys()
    for step in ddp:
        assert math.isclose(fsdp2[step], ddp[step], rel_tol=1e-5, abs_tol=1e-5), (step, fsdp2[step], ddp[step])
    last = lm_fsdp2 / "runs/lm/version_0/checkpoints/last.ckpt"
    assert last.is_file() and torch.load(last, weights_only=True)["global_step"] == STEPS
    assert_same_weights(weights(last), weights(ddp_uninterrupted / "runs/lm/version_0/checkpoints/last.ckpt"),
                        atol=1e-5)
    assert [p.name for p in (lm_fsdp2 / "runs/lm").iterdir()] == ["version_0"]  # the resume logged into the run
    groups = [json.loads((lm_fsdp2 / f"decay_groups.{r}.json").read_text()) for r in range(2)]
    assert groups[0] == groups[1] and groups[0]["decay"]["sharded"] and groups[0]["no_decay"]["sharded"]
    assert "net.token_emb.weight" in groups[0]["no_decay"]["params"]  # embeddings and 1-D gains: no decay
    assert all(name.endswith(".weight") for name in groups[0]["decay"]["params"])


# ---------------------------------------------------------------------------------------------
# the image task


@pytest.fixture(scope="module")
def vit_ddp(tmp_path_factory) -> Path:
    """vit.yaml (tiny net) on 2 ddp ranks for 4 steps with an EMA callback."""
    tmp = tmp_path_factory.mktemp("vit_ddp")
    assert run_ranks(tmp, "fit", "--config", "vit.yaml", *VIT, *EMA, "--trainer.strategy=ddp",
                     f"--trainer.max_steps={STEPS}") == [0, 0]
    return tmp


def vit_last(run_dir: Path) -> Path:
    return run_dir / "runs/vit/version_0/checkpoints/last.ckpt"


@pytest.mark.slow
def test_vit_two_process_accuracy_with_ema_equals_one_process(vit_ddp, tmp_path):
    """Both ranks validate the EMA weights (the callback swaps them in on each) and every one of the 287
    validation images once: the synchronised val/acc equals one process validating the checkpoint, whose
    state_dict holds the averaged weights. The accuracy is above chance and below 1, so one image counted
    twice (287 does not divide by 2) would change it."""
    from datamodules import ImageDataModule
    from lit_modules import ImageClassifier

    (run,) = (vit_ddp / "runs" / "vit").iterdir()
    two = read_scalars(run)["val/acc"][-1]
    module = ImageClassifier.load_from_checkpoint(vit_last(vit_ddp), weights_only=True)
    data = ImageDataModule(root=None, batch_size=64, val_split=None, val_fraction=0.2)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    (one,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isclose(one["val/acc"], two, abs_tol=1e-6), (one["val/acc"], two)
    assert len(data.val_dataset) == 287 and 0.1 < one["val/acc"] < 1.0  # 10 classes: chance is 0.1
    checkpoint = torch.load(vit_last(vit_ddp), weights_only=True)
    assert not torch.equal(checkpoint["state_dict"]["net.head.weight"],
                           checkpoint["current_model_state"]["net.head.weight"])  # validated: the EMA


@pytest.mark.slow
def test_sigterm_to_every_rank_stops_both_at_one_step_and_resumes_exactly(vit_ddp, tmp_path):
    """What SLURM does to a job step: every rank gets SIGTERM (here each sends it to itself at the same
    step). Both exit 143 after the same step, one consistent last.ckpt, and the resumed run ends bit for
    bit where the uninterrupted one did (EMA included)."""
    args = ["fit", "--config", "vit.yaml", *VIT, *EMA, "--trainer.strategy=ddp", f"--trainer.max_steps={STEPS}",
            "--trainer.limit_val_batches=1"]  # (validation changes no training state)
    assert run_ranks(tmp_path, *args, "--trainer.callbacks+=test_faults.SigtermSelfAt",
                     f"--trainer.callbacks.step={STOP - 1}") == [128 + signal.SIGTERM] * 2
    assert torch.load(vit_last(tmp_path), weights_only=True)["global_step"] == STOP
    assert run_ranks(tmp_path, *args, "--ckpt_path", "last") == [0, 0]
    for key in ("state_dict", "current_model_state"):
        assert_same_weights(weights(vit_last(tmp_path), key), weights(vit_last(vit_ddp), key))


@pytest.mark.slow
def test_fsdp2_vit_with_distributed_checkpoint_resumes_as_ddp(vit_ddp, tmp_path):
    """The image task under fsdp2 with sharded checkpoints (a last.ckpt directory, found by `--ckpt_path
    last`): DDP's losses step by step (1e-5) through a mid-epoch stop and resume, DDP's weights at the end,
    and the same weight-decay groups as unsharded DDP, over DTensor parameters."""
    strategy = ["--trainer.strategy=lit_modules.FSDP2Strategy", "--trainer.strategy.save_distributed_checkpoint=true"]
    args = ["fit", "--config", "vit.yaml", *VIT, *strategy, "--trainer.limit_val_batches=1"]
    assert run_ranks(tmp_path, *args, f"--trainer.max_steps={STOP}") == [0, 0]
    assert vit_last(tmp_path).is_dir()
    assert run_ranks(tmp_path, *args, f"--trainer.max_steps={STEPS}", "--ckpt_path", "last") == [0, 0]
    fsdp2, ddp = scalars(tmp_path / "runs", "train/loss"), scalars(vit_ddp / "runs", "train/loss")
    assert len(fsdp2) == len(ddp) == STEPS
    for (step, a), b in zip(sorted(fsdp2.items()), (ddp[k] for k in sorted(ddp))):  # (a resume logs one step on)
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (step, a, b)
    assert_same_weights(weights(vit_last(tmp_path)), weights(vit_last(vit_ddp), "current_model_state"), atol=1e-5)
    sharded, plain = (json.loads((d / "decay_groups.0.json").read_text()) for d in (tmp_path, vit_ddp))
    assert sharded["decay"]["sharded"] and not plain["decay"]["sharded"]
    for group in ("decay", "no_decay"):
        assert sharded[group]["params"] == plain[group]["params"] and sharded[group]["weight_decay"] == \
            plain[group]["weight_decay"]
    assert any(name.endswith("pos_embed") for name in sharded["no_decay"]["params"])


# ---------------------------------------------------------------------------------------------
# cluster scripts


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


def test_image_evaluation_shards_every_image_once_and_accuracy_is_exact(vit_ddp):
    """The image loaders under DDP: val/test/predict use the no-padding `ShardSampler`, so the accuracy
    merged over 2 ranks (torchmetrics sums their states) is the 1-process figure, on an odd split with the
    trained checkpoint (better than chance: a duplicated image would show)."""
    from torch.utils.data import DataLoader, Subset
    from torchmetrics.classification import MulticlassAccuracy

    from datamodules import ImageDataModule
    from datamodules.text import ShardSampler
    from lit_modules import ImageClassifier

    data = ImageDataModule(root=None, batch_size=64, val_split=None, val_fraction=0.2)
    data.setup("fit")
    assert isinstance(data.val_dataloader().sampler, ShardSampler)
    val = data.val_dataset
    shards = [list(ShardSampler(val, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(val))) and len(val) % 2 == 1  # each image once
    model = ImageClassifier.load_from_checkpoint(vit_last(vit_ddp), weights_only=True).net.eval()

    def accuracy(dataset) -> MulticlassAccuracy:
        metric = MulticlassAccuracy(10, average="micro")
        with torch.no_grad():
            for images, targets in DataLoader(dataset, batch_size=128):
                metric.update(model(images), targets)
        return metric

    one = accuracy(val).compute()
    rank0, rank1 = (accuracy(Subset(val, shard)) for shard in shards)
    rank0.merge_state(rank1)  # what the DDP sync does with the two ranks' states
    assert torch.equal(rank0.compute(), one) and 0.1 < one < 1
    padded = accuracy(Subset(val, [*range(len(val)), 0])).compute()  # DistributedSampler's padding
    assert not torch.equal(padded, one)
