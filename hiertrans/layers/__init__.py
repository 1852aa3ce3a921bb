"""Building blocks shared by the language model and the vision models."""

from .attention import Attention, attend, attention_probs, local_attend, merge_heads, split_heads
from .drop import DropPath, drop_path, linear_drop_path_rates
from .linear import Linear, set_onednn_linear
from .mlp import FeedForward
from .norm import RMSNorm, make_norm
from .rotary import RotaryEmbedding, apply_rotary
from .shift import token_shift

__all__ = [
    "Attention",
    "DropPath",
    "FeedForward",
    "Linear",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "attend",
    "attention_probs",
    "drop_path",
    "linear_drop_path_rates",
    "local_attend",
    "make_norm",
    "merge_heads",
    "set_onednn_linear",
    "split_heads",
    "token_shift",
]
