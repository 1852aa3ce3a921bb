"""Callbacks shared by the tasks."""

import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class ValidateAtEnd(Callback):
    """Validate (and so checkpoint) after the last step of a `max_steps`-limited run.

    Lightning validates at epoch ends and every `val_check_interval`; a run that stops on
    `max_steps` mid-epoch would otherwise end without its final figures.
    """

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # Lightning runs validation when a stop is requested


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite; no optimizer step or checkpoint used it."""


class StopOnNonFiniteLoss(Callback):
    """Stop with `NonFiniteLossError("non-finite loss ... at step N")` before a NaN/inf loss is
    back-propagated, so neither the weights nor any checkpoint ever hold the bad state (the last
    checkpoint written stays the last good one). Under DDP the decision is shared by all ranks:
    one rank's NaN batch stops every rank (otherwise the others would hang in the next all-reduce).
    """

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = loss.detach().float().item()
            shown = "nan" if math.isnan(value) else ("inf" if math.isinf(value) else "non-finite on another rank")
            raise NonFiniteLossError(
                f"non-finite loss ({shown}) at step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {trainer.fit_loop.epoch_loop.batch_idx}): training stopped before the optimizer applied "
                "it; the last checkpoint is the last good state (try a lower lr or gradient clipping)")


def last_checkpoint(trainer: Trainer) -> tuple[Path, ModelCheckpoint | None]:
    """Where `--ckpt_path last` looks, and the ModelCheckpoint that writes there: the checkpoint directory
    of the `save_last` ModelCheckpoint."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    chosen = next((cb for cb in callbacks if cb.save_last and cb.dirpath), None) or next(
        (cb for cb in callbacks if cb.dirpath), None)
    directory = Path(chosen.dirpath) if chosen is not None else Path(trainer.default_root_dir) / "checkpoints"
    name = (chosen.CHECKPOINT_NAME_LAST if chosen is not None else "last") + ModelCheckpoint.FILE_EXTENSION
    return directory / name, chosen


class SaveOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, `kill`, SLURM's time limit), write `last.ckpt` and stop with
    `SIGTERMException` (exit 143 from the CLI) at the end of the training step in flight.

    The signal may reach one rank (`kill <pid>`, or the `ddp` launcher's main process) or every rank at
    once (SLURM and torchrun signal each task). The handler only takes note; at the end of every
    training step the ranks agree (one small all-reduce: "did any rank get SIGTERM?") and all stop after
    that same step, so the checkpoint is one consistent step boundary, and `fit --ckpt_path last`
    continues exactly there. This handler replaces Lightning's own for the run: Lightning 2.6's
    broadcasts from inside the signal handler, which breaks when every rank is signalled (the ranks'
    broadcasts pair with whatever collective the others are in). Lightning writes checkpoints
    atomically (a temporary file, then a rename), so a SIGKILL after a grace period cannot leave a
    truncated `last.ckpt` behind.
    """

    def __init__(self) -> None:
        self.signalled = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signalled = False  # (Lightning puts the handlers it found back when the run ends)

    def _note(self, signum: int, frame: Any) -> None:
        self.signalled = True  # no I/O, no collectives: the handler may run in the middle of anything

    def _install(self) -> None:
        # after Lightning registered its handler (just before the loops start); main thread only
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stop = self.signalled or trainer.received_sigterm  # Lightning's handler may have seen one first
        if trainer.world_size > 1:  # every rank, every step: all stop after the same one
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise SIGTERMException

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        path, writer = last_checkpoint(trainer)
        if writer is not None and writer.save_last:
            # recorded in the checkpoint: resumed, the callback overwrites this file (a last.ckpt it did not
            # write itself would make it write last-v1.ckpt, and the next `--ckpt_path last` take the old one)
            writer.last_model_path = str(path)
        trainer.save_checkpoint(path)  # collective: every rank takes part, rank zero writes (fsdp2: gathers)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
