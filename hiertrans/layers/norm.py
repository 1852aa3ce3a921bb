import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: the composite autograd of `F.rms_norm` (PyTorch fuses
    the backward on CUDA only) spends most of a CPU step's norm time in `pow` and its backward.

    With r = rsqrt(mean(x^2) + eps), x̂ = x r, gw = g w:
    dx = r (gw - x̂ mean(gw x̂)),  dw = sum over rows of g x̂.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)  # x_hat instead of x: same memory, one pass less later
        return x_hat * weight

    @staticmethod
    @once_differentiable  # rstd is saved as a constant: a second derivative would be wrong, so refuse it
    def backward(ctx, grad: Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        grad_w = grad * weight
        mean = (grad_w * x_hat).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_w, x_hat, mean, value=-1.0).mul_(rstd)
        grad_weight = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """`F.rms_norm` over the last axis; in full precision on devices without a fused backward (CPU),
    through `_RMSNormFunction`, which gives the same values and gradients faster."""
    if x.device.type == "cuda" or not torch.is_grad_enabled() or x.dtype not in (torch.float32, torch.float64):
        return F.rms_norm(x, weight.shape, weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; `(..., dim) -> (..., dim)`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """A norm by name: `layernorm` or `rmsnorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}; expected 'layernorm' or 'rmsnorm'")
