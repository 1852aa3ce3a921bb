import torch
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` over the last axis with a learned gain and eps 1e-6; `(..., dim) -> (..., dim)`.

    `F.rms_norm` on every device (fused on GPUs; `hiertrans.cpu_kernels` has a faster CPU backward).
    Without autograd on a CPU in fp32/fp64, the same formula in the same ATen ops without
    `F.rms_norm`'s extra copy and casts: the same values, half the op calls (decoding a token runs
    a few dozen norms of one row each, where the calls are the cost).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_grad_enabled():
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return super().forward(x)


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """A norm by name: `layernorm` or `rmsnorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}; expected 'layernorm' or 'rmsnorm'")
