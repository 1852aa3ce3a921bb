import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_shift(x: Tensor) -> Tensor:
    """Causal token shift: the second half of the features comes from the previous position.

    `(b, n, d) -> (b, n, d)`; position 0 receives zeros, so nothing flows backwards in time. With an
    odd d the first, unshifted half gets the extra feature (as `x.chunk(2, -1)`).
    """
    here, previous = x.chunk(2, dim=-1)
    return torch.cat((here, F.pad(previous, (0, 0, 1, -1))), dim=-1)  # pad one step in front, drop the last


class TokenShift(nn.Module):
    """`token_shift` as a parameter-free module, so that `hiertrans.cpu_kernels` can swap its kernel in."""

    def forward(self, x: Tensor) -> Tensor:
        return token_shift(x)
