import torch
from torch import Tensor


class _TokenShift(torch.autograd.Function):
    """One copy each way, where chunk + pad + cat would copy (and zero-fill) two to three times."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        split = (x.shape[-1] + 1) // 2  # as x.chunk(2, -1): the first half gets the odd feature
        ctx.split = split
        out = torch.empty_like(x)
        out[..., :split] = x[..., :split]
        out[..., 1:, split:] = x[..., :-1, split:]
        out[..., :1, split:] = 0
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        split = ctx.split
        grad_x = torch.empty_like(grad)
        grad_x[..., :split] = grad[..., :split]
        grad_x[..., :-1, split:] = grad[..., 1:, split:]
        grad_x[..., -1:, split:] = 0
        return grad_x


def token_shift(x: Tensor) -> Tensor:
    """Causal token shift: the second half of the features comes from the previous position.

    `(b, n, d) -> (b, n, d)`; position 0 receives zeros, so nothing flows backwards in time.
    """
    return _TokenShift.apply(x)
