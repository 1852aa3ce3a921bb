"""LightningModules: one per task."""

from .callbacks import ValidateAtEnd
from .classifier import ImageClassifier, TorchThreads
from .language_model import LanguageModel

__all__ = ["ImageClassifier", "LanguageModel", "TorchThreads", "ValidateAtEnd"]
