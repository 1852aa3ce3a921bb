import torch
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `p`."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth on a residual branch; identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def linear_drop_path_rates(rate: float, total: int) -> list[float]:
    """Stochastic depth probabilities rising linearly from 0 to `rate` over `total` blocks."""
    # on the CPU explicitly: a default-device context (e.g. meta, to count parameters) must not leak in
    return torch.linspace(0, rate, total, device="cpu").tolist() if total > 1 else [0.0] * total
