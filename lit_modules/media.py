"""Figures and text for whichever loggers a run has: TensorBoard, CSV and Weights & Biases alike.

- TensorBoard: `add_figure` / `add_text` (text as a markdown code block, so whitespace survives).
- CSV: files next to `metrics.csv`, under `<log_dir>/media/`: `<tag>_step<N>.png` and `.txt` (tags'
  slashes become `_`), each written atomically.
- W&B (`WandbLogger`, online or `offline=True`): `log_image` and a `log_text` table row.
Other loggers are skipped. Call from any rank: only rank zero writes.
"""

import re
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from hiertrans.io import atomic_write


def takes_media(loggers: Iterable[Logger]) -> bool:
    """Whether any logger would keep a figure or a text (so callers can skip making one)."""
    return any(isinstance(lg, (TensorBoardLogger, CSVLogger, WandbLogger)) for lg in loggers)


def _media_file(logger: CSVLogger, tag: str, step: int, suffix: str) -> Path:
    return Path(logger.log_dir) / "media" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}_step{step}{suffix}"


@rank_zero_only
def log_figure(loggers: Iterable[Logger], tag: str, figure, step: int) -> None:
    """A matplotlib figure to every logger that keeps figures."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        elif isinstance(logger, CSVLogger):
            with atomic_write(_media_file(logger, tag, step, ".png")) as f:
                figure.savefig(f, format="png", dpi=100)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[figure], step=step)


@rank_zero_only
def log_text(loggers: Iterable[Logger], tag: str, text: str, step: int) -> None:
    """A text (e.g. a generated sample) to every logger that keeps text."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, "```\n" + text.replace("```", "'''") + "\n```", step)
        elif isinstance(logger, CSVLogger):
            with atomic_write(_media_file(logger, tag, step, ".txt"), "w", encoding="utf-8") as f:
                f.write(text)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)
