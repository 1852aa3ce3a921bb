from torch import nn


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` over the last axis with a learned gain and eps 1e-6; `(..., dim) -> (..., dim)`.

    `F.rms_norm` on every device (fused on GPUs; `hiertrans.cpu_kernels` has a faster CPU backward).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """A norm by name: `layernorm` or `rmsnorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}; expected 'layernorm' or 'rmsnorm'")
