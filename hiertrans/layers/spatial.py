"""Token-grid primitives for MetaFormer-style vision blocks (PoolFormer, PVT v2).

They take patch tokens `(b, h*w, c)` plus the grid `(height, width)` where they need it, so blocks
can stay in the token layout of `hiertrans.vit` throughout.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .mlp import FeedForward
from .rotary import RotaryEmbedding, apply_rotary


def to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """Patch tokens `(b, h*w, c)` as a map `(b, c, h, w)`.

    A view, not a copy: the result has channels-last strides, which conv2d consumes directly.
    """
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)


def on_grid(x: Tensor, height: int, width: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a map function `(b, c, h, w) -> (b, c', h', w')` to the grid tokens of
    `(b, prefix + h*w, c)`; tokens in front of the grid (a class token) pass through unchanged.
    """
    prefix = x.shape[1] - height * width
    grid = rearrange(fn(to_map(x[:, prefix:], height, width)), "b c h w -> b (h w) c")
    return torch.cat((x[:, :prefix], grid), dim=1) if prefix else grid


class GroupNorm1(nn.Module):
    """GroupNorm with one group on tokens: `(b, n, c) -> (b, n, c)`.

    Normalises each sample over all tokens and channels together, then a per-channel affine; the
    same as PoolFormer's `GroupNorm(1, c)` on the `(b, c, h, w)` map, without reshaping to it.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.transpose(1, 2), 1, self.weight, self.bias, self.eps).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch (CaiT, PoolFormer): `(..., dim) -> (..., dim)`."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Pooling(nn.Module):
    """PoolFormer's token mixer: `AvgPool2d(pool_size, 1, pool_size // 2)(x) - x` on the grid.

    `(b, h*w, c), height, width -> (b, h*w, c)`. Padding is excluded from the averages
    (`count_include_pad=False`); the `- x` cancels the residual's identity, as in the paper.
    No parameters.
    """

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd int >= 1 (so the grid keeps its size), got {pool_size!r}")
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return on_grid(x, height, width, lambda grid: self.pool(grid) - grid)


class TokenFeedForward(FeedForward):
    """The shared `FeedForward` with the grid-aware call signature: `(b, n, dim), h, w -> (b, n, dim)`."""

    def forward(self, x: Tensor, height: int | None = None, width: int | None = None) -> Tensor:
        return super().forward(x)


class DWConvFeedForward(nn.Module):
    """PVT v2 feed-forward: fc1 -> 3x3 depthwise conv -> GELU -> dropout -> fc2 -> dropout.

    `(b, prefix + h*w, dim), height, width -> same`. The depthwise conv mixes neighbouring
    tokens, which is what lets PVT v2 drop position embeddings (zero padding leaks position).
    Tokens in front of the grid (a class token) skip the conv: they have no place on it.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = on_grid(self.fc1(x), height, width, self.dwconv)
        return self.drop(self.fc2(self.drop(self.act(x))))


class PosConv(nn.Module):
    """Conditional position encoding (CPVT's PEG, as in Twins-PCPVT): `x + DWConv3x3(x)` over the
    token map, `(b, prefix + h*w, dim), H, W -> same`; prefix tokens (a class token) pass through.

    Position comes from the zero padding at the borders, so it follows any input size without
    resizing, and the 3x3 neighbourhood gives every stage some locality for 9 weights per channel.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return on_grid(x, height, width, lambda grid: grid + self.proj(grid))


class AxialRotaryEmbedding(nn.Module):
    """2-D (axial) rotary position embedding for queries/keys on a grid.

    The first half of each head's feature pairs rotates with the row, the second half with the
    column, at the RoFormer frequencies of a `dim_head // 2` rotary (so `dim_head % 4 == 0`).
    Positions may be fractional: `rotation(h, w, step, offset)` places grid cell `(i, j)` at
    `(offset + step * i, offset + step * j)`, which lets keys pooled by a factor `sr` sit at the
    centres of their cells (`step=sr, offset=(sr - 1) / 2`). The dot product of a rotated query
    and key then depends on their 2-D offset only.
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 4:
            raise ValueError(f"2-D rotary embeddings need dim_head divisible by 4, got {dim_head}")
        self.register_buffer("inv_freq", RotaryEmbedding(dim_head // 2, base).inv_freq, persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    def rotation(self, height: int, width: int, step: float = 1.0, offset: float = 0.0,
                 device: torch.device | None = None) -> Tensor:
        """`(height * width, dim_head / 2, 2)` rotations (cos, sin), row-major over the grid."""
        device = device or self.inv_freq.device
        key = (height, width, step, offset, device)
        if key not in self._cache:
            inv_freq = self.inv_freq.to(device)
            rows = torch.arange(height, device=device, dtype=torch.float32) * step + offset
            cols = torch.arange(width, device=device, dtype=torch.float32) * step + offset
            angles = torch.cat((torch.outer(rows, inv_freq)[:, None].expand(-1, width, -1),
                                torch.outer(cols, inv_freq)[None].expand(height, -1, -1)), dim=-1)
            angles = angles.reshape(height * width, -1)
            self._cache[key] = torch.stack((angles.cos(), angles.sin()), dim=-1)
        return self._cache[key]

    def rotate(self, x: Tensor, height: int, width: int, step: float = 1.0, offset: float = 0.0) -> Tensor:
        """Rotate `(..., height * width, dim_head)` by the grid positions."""
        return apply_rotary(x, self.rotation(height, width, step, offset, x.device))
