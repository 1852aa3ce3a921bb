import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_shift(x: Tensor, before: Tensor | None = None) -> Tensor:
    """Causal token shift: the second half of the features comes from the previous position.

    `(b, n, d) -> (b, n, d)`; position 0 receives zeros, so nothing flows backwards in time, or
    `before (b, 1, d)`, the position before x, when decoding continues a sequence. With an odd d
    the first, unshifted half gets the extra feature (as `x.chunk(2, -1)`).
    """
    if before is not None and x.shape[-2] == 1:  # decoding one position: the fast path
        split = (x.shape[-1] + 1) // 2
        if torch.compiler.is_compiling():
            return torch.cat((x[..., :split], before[..., split:]), dim=-1)
        return torch.where(_leading(x.shape[-1], split, x.device), x, before)  # one call, not three
    here, previous = x.chunk(2, dim=-1)
    if before is None:
        return torch.cat((here, F.pad(previous, (0, 0, 1, -1))), dim=-1)  # pad one step in front, drop the last
    earlier = torch.cat((before[..., here.shape[-1] :], previous[:, :-1]), dim=1)
    return torch.cat((here, earlier), dim=-1)


@functools.cache
def _leading(dim: int, count: int, device: torch.device) -> Tensor:
    """`(dim,)`, True on the first `count` features."""
    return torch.arange(dim, device=device) < count


class TokenShift(nn.Module):
    """`token_shift` as a parameter-free module, so that `hiertrans.cpu_kernels` can swap its kernel in."""

    def forward(self, x: Tensor) -> Tensor:
        return token_shift(x)
