import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) for `(..., n, dim_head)` queries and keys.

    Feature pairs (2i, 2i+1) rotate by angle `pos * base^(-2i/dim_head)`, applied as one complex
    multiply (a single fused pass, forward and backward). The rotation table is cached per device,
    grown to the longest length asked for (row p is the same whatever the table's length).
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"rotary embeddings need an even dim_head, got {dim_head}")
        inv_freq = 1.0 / base ** (torch.arange(0, dim_head, 2).float() / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple | None = None

    def rotation(self, n: int, device: torch.device) -> Tensor:
        """`(n, dim_head / 2)` complex unit rotations of positions 0 .. n - 1."""
        if self._cache is None or self._cache[0] != device or self._cache[1].shape[0] < n:
            # while decoding, n grows by one a step: grow the table in doublings, not every step
            length = n if self._cache is None or self._cache[0] != device else max(n, 2 * self._cache[1].shape[0])
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (device, torch.polar(torch.ones_like(angles), angles))
        return self._cache[1][:n]

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate `(..., n, dim_head)` queries and keys of positions `offset .. offset + n - 1`."""
        rotation = self.rotation(offset + q.shape[-2], q.device)[offset:]
        return apply_rotary(q, rotation), apply_rotary(k, rotation)

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate `x (..., n, dim_head)` (queries and keys stacked, say) at positions `offset ..`."""
        return apply_rotary(x, self.rotation(offset + x.shape[-2], x.device)[offset:])


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate feature pairs of `x (..., n, d)` by complex `rotation (n, d/2)`; computed in fp32."""
    exact = x.dtype == torch.float32  # no cast ops to call (decoding runs dozens of these a token)
    pairs = torch.view_as_complex((x if exact else x.float()).unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * rotation).flatten(-2)
    return rotated if exact else rotated.type_as(x)
