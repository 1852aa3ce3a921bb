"""Callbacks shared by the tasks."""

from lightning.pytorch import Callback, LightningModule, Trainer


class ValidateAtEnd(Callback):
    """Validate (and so checkpoint) after the last step of a `max_steps`-limited run.

    Lightning validates at epoch ends and every `val_check_interval`; a run that stops on
    `max_steps` mid-epoch would otherwise end without its final figures.
    """

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # Lightning runs validation when a stop is requested
