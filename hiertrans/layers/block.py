from torch import Tensor, nn

from .attention import Attention
from .mlp import FeedForward
from .norm import RMSNorm
from .shift import TokenShift


class CausalBlock(nn.Module):
    """Pre-norm causal transformer block, `(b, n, dim) -> (b, n, dim)`:
    `x + attn(norm(shift(x)))`, then `x + ff(norm(shift(x)))`.

    Attention is causal with rotary embeddings: full (`window_size=None`), over the last
    `window_size` positions, or left out (`window_size=0`). `token_shift` feeds each sublayer half
    its features from the previous position (simple-hierarchical-transformer's blocks do).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4,
                 window_size: int | None = None, token_shift: bool = False):
        super().__init__()
        self.shift = TokenShift() if token_shift else nn.Identity()
        self.attn_norm = self.attn = None
        if window_size != 0:
            self.attn_norm = RMSNorm(dim)
            self.attn = Attention(dim, heads, dim_head, causal=True, window_size=window_size, rotary=True,
                                  out_bias=False)
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, int(dim * ff_mult), bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(self.shift(x)))
        return x + self.ff(self.ff_norm(self.shift(x)))
