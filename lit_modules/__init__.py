"""LightningModules: one per task, and the callbacks they share."""

from .callbacks import NonFiniteLossError, SaveOnSigterm, StopOnNonFiniteLoss, ValidateAtEnd
from .classifier import ImageClassifier, TorchThreads
from .language_model import LanguageModel

__all__ = ["ImageClassifier", "LanguageModel", "NonFiniteLossError", "SaveOnSigterm", "StopOnNonFiniteLoss",
           "TorchThreads", "ValidateAtEnd"]
