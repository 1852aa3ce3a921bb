import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) for `(..., n, dim_head)` queries and keys.

    The cos/sin tables are cached per length, device and dtype, so a forward pass does not
    rebuild them.
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"rotary embeddings need an even dim_head, got {dim_head}")
        inv_freq = 1.0 / base ** (torch.arange(0, dim_head, 2).float() / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple | None = None

    def tables(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (n, device, dtype)
        if self._cache is None or self._cache[0] != key:
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            freqs = torch.cat((freqs, freqs), dim=-1)
            self._cache = (key, freqs.cos().to(dtype), freqs.sin().to(dtype))
        return self._cache[1], self._cache[2]

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.tables(q.shape[-2], q.device, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin
