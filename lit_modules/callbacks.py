"""Callbacks shared by the tasks."""

import math
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, ThroughputMonitor, WeightAveraging
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


def ema_warmup_update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor,
                      decay: float) -> None:
    """One EMA step in place with timm's warm-up: the decay is `min(decay, (1 + n) / (10 + n))` after `n`
    averages, so early averages follow the weights instead of keeping the random initialisation for
    thousands of steps. `num_averaged` stays a tensor (no host sync); integer buffers are copied."""
    weight = 1 - ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay)
    for average, value in zip(ema, current):
        if average.is_floating_point():
            average.lerp_(value, weight.to(average.dtype))
        else:
            average.copy_(value)


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights: Lightning's `EMAWeightAveraging` with timm's
    warm-up (`ema_warmup_update`) by default. Updated after every optimizer step; validation runs on
    the averaged weights (swapped in, and back after it); checkpoints hold them as `state_dict` (so
    `predict`, `test` and `load_from_checkpoint` use them) and the trained weights as
    `current_model_state`, with the update count in `averaging_state`; `--ckpt_path` resumes both exactly.
    DDP: every rank averages its own identical copy. Not with fsdp2 (an unsharded copy of the model).

    Args:
        decay: the decay once warmed up; the average spans about `1 / (1 - decay)` steps.
        warmup: raise the decay as (1 + n) / (10 + n) over the first updates; False is Lightning's
            plain EMA (a copy of the weights at the first update, then `decay` from the second).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch, device, use_buffers:
            as in `EMAWeightAveraging`.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1,
                 update_starting_at_step: int | None = None, update_starting_at_epoch: int | None = None,
                 device: str | None = None, use_buffers: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.decay, self.warmup = decay, warmup
        if warmup:  # the AveragedModel's arguments (WeightAveraging keeps them): ours replaces the plain EMA
            self._kwargs.pop("avg_fn")
            self._kwargs["multi_avg_fn"] = partial(ema_warmup_update, decay=decay)


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the images of `(images, targets, ...)`, the windows of a `(b, n + 1)` token batch."""
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


def batch_items(batch: Any) -> int:
    """What a task processes per sample, summed: the tokens predicted from a `(b, n + 1)` token batch
    (`b * n`), else the samples (images)."""
    if isinstance(batch, torch.Tensor) and batch.ndim == 2:
        return int(batch.shape[0] * (batch.shape[1] - 1))
    return batch_samples(batch)


class Throughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` for both tasks, over the last `window_size` steps (training time
    only: validation is taken out), logged every `log_every_n_steps` once the window is full. Per
    process: `train/device/samples_per_sec` (images, or text windows), `train/device/items_per_sec`
    (images, or tokens), `train/device/batches_per_sec`, `train/device/flops_per_sec` from the task's
    `flops_per_batch` (`Task.setup` counts it) and, on GPUs Lightning knows, `train/device/mfu`; with
    several processes also the totals (`train/samples_per_sec`, `items_per_sec`, `flops_per_sec`).
    The same under `validate/` for validation."""

    def __init__(self, window_size: int = 10) -> None:
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"window_size must be an int >= 2, got {window_size!r}")
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_items, window_size=window_size)
        self.window_size = window_size


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
    continues exactly there. With gradient accumulation, a step is the optimizer's: the batches of an
    unfinished accumulation run first (their gradients are not in the checkpoint). This handler
    replaces Lightning's own for the run: Lightning 2.6's
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

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if ((batch_idx + 1) % trainer.accumulate_grad_batches
                and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            return  # gradients still accumulating: stop after the optimizer step, a step boundary to resume from
        stop = self.signalled or trainer.received_sigterm  # Lightning's handler may have seen one first
        if trainer.world_size > 1:  # every rank, every step: all stop after the same one
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise SIGTERMException

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        path, writer = last_checkpoint(trainer)
        # the raise skipped the batch end of the callbacks after this one (an EMA a task adds through
        # configure_callbacks comes after the CLI's SaveOnSigterm): averaging ones update for the step first
        # (at most once per optimizer step), so the checkpoint holds what an uninterrupted run has
        for callback in trainer.callbacks[trainer.callbacks.index(self) + 1:]:
            if isinstance(callback, WeightAveraging):
                callback.on_train_batch_end(trainer, pl_module, None, None, trainer.fit_loop.epoch_loop.batch_idx)
        if writer is not None and writer.save_last:
            # recorded in the checkpoint: resumed, the callback overwrites this file (a last.ckpt it did not
            # write itself would make it write last-v1.ckpt, and the next `--ckpt_path last` take the old one)
            writer.last_model_path = str(path)
        trainer.save_checkpoint(path)  # collective: every rank takes part, rank zero writes (fsdp2: gathers)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
