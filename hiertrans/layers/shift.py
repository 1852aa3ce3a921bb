import torch
import torch.nn.functional as F
from torch import Tensor


def token_shift(x: Tensor) -> Tensor:
    """Causal token shift: the second half of the features comes from the previous position.

    `(b, n, d) -> (b, n, d)`; position 0 receives zeros, so nothing flows backwards in time.
    """
    x, x_shift = x.chunk(2, dim=-1)
    return torch.cat((x, F.pad(x_shift, (0, 0, 1, -1))), dim=-1)
