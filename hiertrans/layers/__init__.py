"""Building blocks shared by the language models and the vision models: plain PyTorch only.

Optional CPU kernels for some of them (oneDNN linears, RMSNorm and token-shift backward passes,
the sliding-window layout) live in `hiertrans.cpu_kernels`, switched on per model.
"""

from .attention import Attention, attend, attention_probs, local_attend, merge_heads, split_heads, with_previous_block
from .block import CausalBlock, GradCheckpointing
from .cache import BlockCache, KVCache
from .checks import check_token_ids, debug_enabled, set_debug
from .drop import DropPath, drop_path, linear_drop_path_rates
from .mlp import FeedForward
from .norm import RMSNorm, make_norm
from .rotary import RotaryEmbedding, apply_rotary
from .shift import TokenShift, token_shift

__all__ = [
    "Attention",
    "BlockCache",
    "CausalBlock",
    "DropPath",
    "FeedForward",
    "GradCheckpointing",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "TokenShift",
    "apply_rotary",
    "attend",
    "attention_probs",
    "check_token_ids",
    "debug_enabled",
    "drop_path",
    "linear_drop_path_rates",
    "local_attend",
    "make_norm",
    "merge_heads",
    "set_debug",
    "split_heads",
    "token_shift",
    "with_previous_block",
]
