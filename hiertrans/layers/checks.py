"""Input checks the models share, and the debug switch for the checks that read tensor values.

Shape and dtype checks are free (Python-level, static under `torch.compile`) and always run.
Checks of token-id values read the tensor, a host sync (a GPU stall, a graph break under
`torch.compile`), so a model's forward runs them only in debug mode: `hiertrans.set_debug(True)`
or `HIERTRANS_DEBUG=1` in the environment. Data pipelines should check ids where they make them;
out-of-range ids still fail in the embedding without debug mode, with a less helpful message.
"""

import os

import torch
from torch import Tensor


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, empty or `0` is off, `1` is on; anything else is an error."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"environment variable {name}={value!r}: expected 1 (on) or 0 (off)")
    return value == "1"


_debug = env_flag("HIERTRANS_DEBUG")


def set_debug(enabled: bool = True) -> bool:
    """Switch on (or off) the input checks that read tensor values; returns the previous setting."""
    global _debug
    previous, _debug = _debug, bool(enabled)
    return previous


def debug_enabled() -> bool:
    return _debug


def check_token_ids(ids: Tensor, num_tokens: int, seq_len: int, values: bool | None = None) -> None:
    """Raise a TypeError/ValueError for token ids a language model cannot take.

    Always: an integer tensor `(batch, length)` with 1 <= length <= seq_len. With `values` (default:
    in debug mode, outside `torch.compile`): every id in `[0, num_tokens)`, at the cost of a sync.
    """
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"ids must be an integer tensor of shape (batch, length), got "
                        f"{getattr(ids, 'dtype', type(ids))}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must have shape (batch, length) with length >= 1, got {tuple(ids.shape)}")
    if ids.shape[1] > seq_len:
        raise ValueError(f"input length {ids.shape[1]} is longer than seq_len={seq_len}")
    if values is None:
        values = _debug and not torch.compiler.is_compiling()
    if values:
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"token ids must lie in [0, {num_tokens - 1}] (num_tokens={num_tokens}), "
                             f"got values from {lo} to {hi}")
