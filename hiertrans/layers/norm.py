import torch
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` over the last axis with a learned gain and eps 1e-6; `(..., dim) -> (..., dim)`.

    `F.rms_norm` on every device (fused on GPUs; `hiertrans.cpu_kernels` has a faster CPU backward).
    Without autograd on a CPU in fp32/fp64, the same formula in fewer and cheaper ATen calls than
    `F.rms_norm`'s (its mean, casts and Python-scalar operands each cost a call or a conversion):
    decoding a token runs a few dozen norms of one row each, where the calls are the cost; the sum
    of squares is one `vector_norm`, squared again inside the `addcmul` that adds eps. (Not under
    `torch.compile`, which fuses `F.rms_norm` itself and would take `_eps` as one more input.)
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)
        # CPU scalar operands of the input's dtype: no conversion per call
        self._eps = {dtype: torch.tensor(eps, dtype=dtype) for dtype in (torch.float32, torch.float64)}

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cpu and x.dtype in (torch.float32, torch.float64) and not (torch.is_grad_enabled()
                                                                      or torch.compiler.is_compiling()):
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            mean_square = torch.addcmul(self._eps[x.dtype], norm, norm, value=1 / x.shape[-1])
            return x * mean_square.rsqrt_() * self.weight
        return super().forward(x)


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """A norm by name: `layernorm` or `rmsnorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}; expected 'layernorm' or 'rmsnorm'")
