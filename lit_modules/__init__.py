"""LightningModules: one per task."""

from .callbacks import ValidateAtEnd
from .language_model import LanguageModel

__all__ = ["LanguageModel", "ValidateAtEnd"]
