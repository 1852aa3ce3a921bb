"""hiertrans: hierarchical transformers for text and images."""

from .layers import Attention, FeedForward, RMSNorm
from .lm import HierarchicalBlock, HierarchicalTransformer

__all__ = [
    "Attention",
    "FeedForward",
    "HierarchicalBlock",
    "HierarchicalTransformer",
    "RMSNorm",
]
__version__ = "0.1.0"
