import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) for `(..., n, dim_head)` queries and keys.

    Feature pairs (2i, 2i+1) rotate by angle `pos * base^(-2i/dim_head)`, applied as one complex
    multiply (a single fused pass, forward and backward). The rotation table is cached per length
    and device.
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"rotary embeddings need an even dim_head, got {dim_head}")
        inv_freq = 1.0 / base ** (torch.arange(0, dim_head, 2).float() / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple | None = None

    def rotation(self, n: int, device: torch.device) -> Tensor:
        """`(n, dim_head / 2)` complex unit rotations."""
        if self._cache is None or self._cache[0] != (n, device):
            angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = ((n, device), torch.polar(torch.ones_like(angles), angles))
        return self._cache[1]

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        rotation = self.rotation(q.shape[-2], q.device)
        return apply_rotary(q, rotation), apply_rotary(k, rotation)


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate feature pairs of `x (..., n, d)` by complex `rotation (n, d/2)`; computed in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)
