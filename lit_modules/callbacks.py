"""Callbacks shared by the tasks."""

import math
from pathlib import Path

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


def last_checkpoint_path(trainer: Trainer) -> Path:
    """Where `--ckpt_path last` looks: the checkpoint directory of the `save_last` ModelCheckpoint."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    chosen = next((cb for cb in callbacks if cb.save_last and cb.dirpath), None) or next(
        (cb for cb in callbacks if cb.dirpath), None)
    directory = Path(chosen.dirpath) if chosen is not None else Path(trainer.default_root_dir) / "checkpoints"
    name = (chosen.CHECKPOINT_NAME_LAST if chosen is not None else "last") + ModelCheckpoint.FILE_EXTENSION
    return directory / name


class SaveOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption, `kill`, SLURM's time limit), write `last.ckpt` before exiting.

    Lightning turns SIGTERM into a `SIGTERMException` raised after the current batch has completed
    (under DDP at the start of the next one, on every rank together), so the state saved is a clean
    step boundary and `fit --ckpt_path last` continues exactly there. Lightning writes checkpoints
    atomically (a temporary file, then a rename), so a second signal (SIGKILL after a grace
    period) cannot leave a truncated `last.ckpt` behind.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # collective: every rank takes part, rank zero writes
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
