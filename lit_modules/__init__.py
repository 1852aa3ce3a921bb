"""LightningModules: one per task, and the callbacks and strategy they share."""

from .callbacks import EMA, NonFiniteLossError, SaveOnSigterm, StopOnNonFiniteLoss, Throughput, ValidateAtEnd
from .classifier import ImageClassifier, TorchThreads
from .fsdp2 import FSDP2Strategy  # registers --trainer.strategy=fsdp2
from .language_model import LanguageModel

__all__ = ["EMA", "FSDP2Strategy", "ImageClassifier", "LanguageModel", "NonFiniteLossError", "SaveOnSigterm",
           "StopOnNonFiniteLoss", "Throughput", "TorchThreads", "ValidateAtEnd"]
