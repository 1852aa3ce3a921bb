"""Faults lose nothing: a run killed (SIGTERM or SIGKILL) and restarted with `--ckpt_path last` ends
with the weights (and EMA) of a run that was never interrupted, data order included (the random crops
resume mid-epoch, they do not restart); a non-finite loss stops training before it touches the weights or a
checkpoint; checkpoints load with `weights_only=True`.

The three CLI runs of each round (reference, SIGTERM, SIGKILL) run concurrently to save wall time.
"""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT
from helpers import TINY_LM_ARGS, cli_in_process

HERE = Path(__file__).resolve().parent  # test_faults (callbacks by class path) and helpers.py, for subprocesses
STEPS, EVERY, PAUSE_AT = 12, 3, 5  # 4 batches, 2 optimizer steps per epoch: the checkpoint at step 3 is mid-epoch

# two batches per optimizer step (lm.yaml's setting): SIGTERM arrives as an accumulation starts
ARGS = [*TINY_LM_ARGS, "--data.init_args.batch_size=4", "--trainer.accumulate_grad_batches=2",
        "--data.init_args.path=corpus.txt",
        "--data.init_args.val_fraction=0.05", "--data.init_args.test_fraction=0.05",
        "--data.init_args.train_samples_per_epoch=16", f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.deterministic=true"]


class PauseAt(pl.Callback):
    """Test helper: at `step`, write `marker` and wait (for a signal) so the test can interrupt the run
    at a known point. Sleeps in short slices: Python resumes an interrupted sleep after a handler runs."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        marker = Path(f"{self.marker}.{trainer.global_rank}")  # one per rank: under DDP every rank waits
        if trainer.global_step != self.step or marker.exists():
            return
        marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class SigtermSelfAt(pl.Callback):
    """Test helper: the run sends itself SIGTERM at `step` (in-process, like `kill <pid>` from outside)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def callbacks_yaml(extra: str = "") -> str:
    checkpoint = f"{{every_n_train_steps: {EVERY}, save_last: true, save_top_k: -1, filename: '{{step}}'}}"
    lines = ["trainer:", "  callbacks:", "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint",
             f"      init_args: {checkpoint}",
             "    - class_path: lit_modules.EMA",  # the LM's EMA resumes too
             "      init_args: {decay: 0.9}"]
    if extra == "pause":
        lines += ["    - class_path: test_faults.PauseAt", f"      init_args: {{step: {PAUSE_AT}, marker: paused}}"]
    elif extra == "sigterm":
        lines += ["    - class_path: test_faults.SigtermSelfAt", f"      init_args: {{step: {PAUSE_AT}}}"]
    return "\n".join(lines) + "\n"


def prepare(d: Path) -> Path:
    (d / "corpus.txt").write_text(inspect.getsource(json) * 2)
    for extra in ("", "pause", "sigterm"):
        (d / f"callbacks_{extra or 'plain'}.yaml").write_text(callbacks_yaml(extra))
    return d


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "hiertrans", "fit", "--config", "lm.yaml", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{out[-2000:]}\n{err[-3000:]}"
    return err


def in_process(cwd: Path, *args: str) -> int:
    """`python -m hiertrans fit --config lm.yaml ...` in this process, one thread; returns the exit code."""
    return cli_in_process(cwd, "fit", "--config", "lm.yaml", *args)


def last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "runs/lm/version_0/checkpoints/last.ckpt", weights_only=True)  # plain data only


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before pausing:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "run never reached the pause"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """reference: never interrupted (in-process, while the SIGKILL run starts up);
    sigkill: a `python -m hiertrans` process killed at step PAUSE_AT, then resumed with --ckpt_path last;
    sigterm: in-process run that receives SIGTERM at step PAUSE_AT, then resumed with --ckpt_path last."""
    dirs = {name: prepare(tmp_path_factory.mktemp(name)) for name in ("reference", "sigterm", "sigkill")}
    killed = start(dirs["sigkill"], "--config", "callbacks_pause.yaml", *ARGS)
    assert in_process(dirs["reference"], "--config", "callbacks_plain.yaml", *ARGS) == 0

    assert in_process(dirs["sigterm"], "--config", "callbacks_sigterm.yaml", *ARGS) == 128 + signal.SIGTERM
    # SIGTERM: last.ckpt written right after the step in flight
    assert last_ckpt(dirs["sigterm"])["global_step"] == PAUSE_AT + 1
    assert in_process(dirs["sigterm"], "--config", "callbacks_plain.yaml", *ARGS, "--ckpt_path", "last") == 0

    wait_for(dirs["sigkill"] / "paused.0", killed)
    killed.send_signal(signal.SIGKILL)
    finish(killed, expect=-signal.SIGKILL)
    # SIGKILL: only the last periodic checkpoint survives (mid-epoch: 4 batches per epoch)
    assert last_ckpt(dirs["sigkill"])["global_step"] == (PAUSE_AT // EVERY) * EVERY
    resumed = start(dirs["sigkill"], "--config", "callbacks_plain.yaml", *ARGS, "--ckpt_path", "last")
    assert "resuming from" in finish(resumed)
    return dirs


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(runs, name):
    reference, resumed = last_ckpt(runs["reference"]), last_ckpt(runs[name])
    assert reference["global_step"] == resumed["global_step"] == STEPS
    # the EMA callback saves the averaged weights as state_dict, the trained ones and the count beside them
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert reference[part].keys() == resumed[part].keys()
        for key in reference[part]:
            torch.testing.assert_close(resumed[part][key], reference[part][key], rtol=0, atol=0, msg=f"{part}: {key}")
    assert not torch.equal(reference["state_dict"]["net.token_emb.weight"],
                           reference["current_model_state"]["net.token_emb.weight"])
    # the resumed run logs into the interrupted run's directory, not a new version_1
    assert [p.name for p in (runs[name] / "runs/lm").iterdir()] == ["version_0"]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import lit_modules.language_model as lm
    from hiertrans.cli import main

    original = lm.LanguageModel.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 4 else loss

    monkeypatch.setattr(lm.LanguageModel, "training_step", poisoned)
    monkeypatch.chdir(tmp_path)
    prepare(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "lm.yaml", "--config", "callbacks_plain.yaml", *ARGS])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "non-finite loss (nan) at step 4" in err and "Traceback" not in err
    checkpoints = tmp_path / "runs/lm/version_0/checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=3.ckpt"]
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_classifier_checkpoints_load_with_weights_only(tmp_path):
    """`class_names` and the hyperparameters are plain data: no pickled objects in our checkpoints."""
    from hiertrans import HierarchialViT
    from lit_modules import ImageClassifier

    net = HierarchialViT(img_size=32, num_classes=2, embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1],
                         depths=[1, 1, 1, 1], sr_ratios=[1, 1, 1, 1])
    module = ImageClassifier(net)
    module.class_names = ["cat", "dog"]
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog"] and ckpt["hyper_parameters"]["label_smoothing"] == 0.1
    assert "net" not in ckpt["hyper_parameters"]  # built in Python: the network object is not pickled
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "c.ckpt", weights_only=True, net=net)
    assert restored.class_names == ["cat", "dog"]


def test_epoch_sampler_resumes_mid_epoch_by_rotating():
    from datamodules.text import EpochSampler

    sampler = EpochSampler(6, epoch=2, start=4)  # 4 crops of epoch 2 already trained on
    assert [i for _, i in sampler] == [4, 5, 0, 1, 2, 3] and len(sampler) == 6
    sampler.set_epoch(3)  # the next epoch starts from its beginning
    assert list(sampler) == [(3, i) for i in range(6)]
    assert [i for _, i in EpochSampler(6, start=6)] == list(range(6))  # a finished epoch skips nothing


def test_periodic_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """Lightning's checkpoint IO (every ModelCheckpoint save) writes through an fsspec transaction:
    a write that dies half-way leaves the previous `last.ckpt` as it was and no partial file."""
    import fsspec.implementations.local as local
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io = TorchCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, target)
    good = target.read_bytes()

    def dies_half_way(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(local.LocalFileOpener, "write", dies_half_way)
    with pytest.raises(OSError, match="mid-write"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
