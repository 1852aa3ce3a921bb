import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) for `(..., n, dim_head)` queries and keys.

    Feature pairs (2i, 2i+1) rotate by angle `pos * base^(-2i/dim_head)`, applied as one complex
    multiply in eager mode (a single pass, forward and backward) and in real arithmetic under
    `torch.compile` (Inductor fuses it; it generates no code for complex ops). The rotation table,
    `(n, dim_head / 2, 2)` (cos, sin) pairs, is cached per device, grown to the longest length asked
    for (row p is the same whatever the table's length).
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"rotary embeddings need an even dim_head, got {dim_head}")
        inv_freq = 1.0 / base ** (torch.arange(0, dim_head, 2).float() / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple | None = None

    def rotation(self, n: int, device: torch.device) -> Tensor:
        """`(n, dim_head / 2, 2)` rotations (cos, sin) of positions 0 .. n - 1."""
        return self._tables(n, device)[0][:n]

    def _tables(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The cached rotations of at least n positions: `(length, dim_head / 2, 2)` (cos, sin), and
        the same memory as complex numbers `(length, dim_head / 2)` (for `rotate_`)."""
        if self._cache is None or self._cache[0] != device or self._cache[1].shape[0] < n:
            # while decoding, n grows by one a step: grow the table in doublings, not every step
            length = n if self._cache is None or self._cache[0] != device else max(n, 2 * self._cache[1].shape[0])
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq.to(device))
            table = torch.stack((angles.cos(), angles.sin()), dim=-1)
            self._cache = (device, table, torch.view_as_complex(table))
        return self._cache[1:]

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate `(..., n, dim_head)` queries and keys of positions `offset .. offset + n - 1`."""
        rotation = self.rotation(offset + q.shape[-2], q.device)[offset:]
        return apply_rotary(q, rotation), apply_rotary(k, rotation)

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate `x (..., n, dim_head)` (queries and keys stacked, say) at positions `offset ..`."""
        if torch.compiler.is_compiling() and x.shape[-2] == 1:  # decoding: no table, whose growth would recompile
            angles = (offset * self.inv_freq)[None]  # what the table's row `offset` holds
            return apply_rotary(x, torch.stack((angles.cos(), angles.sin()), dim=-1))
        return apply_rotary(x, self.rotation(offset + x.shape[-2], x.device)[offset:])

    def rotate_(self, x: Tensor, offset: int) -> Tensor:
        """`rotate` in place for `x (..., 1, dim_head)`, one position (a decoding step, where each of
        the few calls it saves is a sizeable part of the step)."""
        if torch.compiler.is_compiling() or x.dtype != torch.float32:
            return x.copy_(self.rotate(x, offset))
        rotation = self._tables(offset + 1, x.device)[1][offset]
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rotation)
        return x


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate feature pairs of `x (..., n, d)` by `rotation (n, d/2, 2)` (cos, sin); computed in fp32."""
    if torch.compiler.is_compiling():  # real arithmetic: Inductor fuses it (it has no complex codegen)
        cos, sin = rotation.unbind(-1)
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)
    exact = x.dtype == torch.float32  # no cast ops to call (decoding runs dozens of these a token)
    pairs = torch.view_as_complex((x if exact else x.float()).unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * torch.view_as_complex(rotation)).flatten(-2)
    return rotated if exact else rotated.type_as(x)
