import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .cache import BlockCache
from .mlp import FeedForward
from .norm import RMSNorm
from .shift import TokenShift, token_shift


class CausalBlock(nn.Module):
    """Pre-norm causal transformer block, `(b, n, dim) -> (b, n, dim)`:
    `x + attn(norm(shift(x)))`, then `x + ff(norm(shift(x)))`.

    Attention is causal with rotary embeddings: full (`window_size=None`), over the last
    `window_size` positions, or left out (`window_size=0`). `token_shift` feeds each sublayer half
    its features from the previous position (simple-hierarchical-transformer's blocks do).
    `dropout`: on each sublayer's output (and inside the feed-forward), in training only.

    Decoding: `forward(x, cache)` with `cache = block.init_cache(capacity)` continues the sequence
    the cache has seen (a whole prompt into an empty cache, then one position per call).

    `grad_checkpointing` (set through the net's `set_grad_checkpointing`): keep only the block's
    input for the backward and run the block again there, trading one more forward for its activations.
    """

    grad_checkpointing = False

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4,
                 window_size: int | None = None, token_shift: bool = False, dropout: float = 0.0):
        super().__init__()
        self.shift = TokenShift() if token_shift else nn.Identity()
        self.attn_norm = self.attn = None
        if window_size != 0:
            self.attn_norm = RMSNorm(dim)
            self.attn = Attention(dim, heads, dim_head, causal=True, window_size=window_size, rotary=True,
                                  out_bias=False, proj_drop=dropout)
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, int(dim * ff_mult), bias=False, dropout=dropout)

    def forward(self, x: Tensor, cache: BlockCache | None = None) -> Tensor:
        if cache is not None:
            return self.decode(x, cache)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.sublayers, x, use_reentrant=False)
        return self.sublayers(x)

    def sublayers(self, x: Tensor) -> Tensor:
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(self.shift(x)))
        return x + self.ff(self.ff_norm(self.shift(x)))

    def init_cache(self, capacity: int) -> BlockCache:
        """Decoding state for sequences of up to `capacity` positions (a window needs only its own)."""
        window = self.attn.window_size if self.attn is not None else None
        return BlockCache(capacity if window is None else min(capacity, window + 1))

    def decode(self, x: Tensor, cache: BlockCache) -> Tensor:
        """`forward` for `x (b, n, dim)`, the positions after those `cache` has seen."""
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(self._shift(x, cache, "attn")), cache=cache.kv)
        x = x + self.ff(self.ff_norm(self._shift(x, cache, "ff")))
        cache.length += x.shape[-2]
        return x

    def _shift(self, x: Tensor, cache: BlockCache, sublayer: str) -> Tensor:
        if not isinstance(self.shift, TokenShift):
            return x
        shifted = token_shift(x, cache.previous.get(sublayer))
        if x.shape[-2] == 1 and not torch.compiler.is_compiling():
            cache.previous[sublayer] = x
        else:  # a copy with standard strides, whatever x's: the same strides every step (torch.compile guards on them)
            cache.previous[sublayer] = x[:, -1:].clone(memory_format=torch.contiguous_format)
        return shifted


class GradCheckpointing:
    """`set_grad_checkpointing` (timm's name for it) for a network built of `CausalBlock`s."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every causal block in the backward instead of keeping its activations: about a
        third more compute per training step for the activation memory of the blocks' inputs only."""
        for module in self.modules():
            if isinstance(module, CausalBlock):
                module.grad_checkpointing = enable
