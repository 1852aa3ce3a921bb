from torch import Tensor, nn


class FeedForward(nn.Module):
    """Position-wise MLP: linear -> GELU -> dropout -> linear -> dropout; `(..., dim) -> (..., dim)`."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if not self.drop.p:  # no dropout: skip the calls (decoding runs a step in ~100 of them)
            return self.fc2(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
