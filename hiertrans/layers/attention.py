"""The attention core shared by every model here: projections around `F.scaled_dot_product_attention`."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .cache import KVCache
from .rotary import RotaryEmbedding


def split_heads(t: Tensor, heads: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(t: Tensor) -> Tensor:
    return rearrange(t, "b h n d -> b n (h d)")


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout: float = 0.0,
           mask: Tensor | None = None) -> Tensor:
    """`(b, h, n, d)` queries against `(b, h, m, d)` keys/values, on SDPA (flash or memory-efficient
    kernels where the device has them).

    `mask`: optional boolean, broadcastable to `(b, h, n, m)`, True where a query may attend to a
    key (e.g. a key-padding mask `(b, 1, 1, m)`); not combinable with `causal`.
    """
    if mask is not None and causal:
        raise ValueError("attend takes either causal=True or an explicit mask, not both")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def attention_probs(q: Tensor, k: Tensor, causal: bool = False) -> Tensor:
    """The attention matrix `(b, h, n, m)` that `attend` applies; materialised only for inspection."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


def _local_mask(window: int, blocks: int, device: torch.device) -> Tensor:
    # Query i of a block sees key j of (previous block ++ this block) iff i <= j <= i + window,
    # i.e. absolute key positions t - window .. t; the first block has no previous block.
    i = torch.arange(window, device=device)[:, None]
    j = torch.arange(2 * window, device=device)[None, :]
    mask = ((j >= i) & (j <= i + window)).expand(blocks, window, 2 * window).clone()
    mask[0, :, :window] = False
    return mask[None]  # 4-D: SDPA's fused CPU kernel takes 4-D masks only (3-D falls back to math)


def with_previous_block(t: Tensor, block: int) -> Tensor:
    """`(b, h, w * n, d) -> (b * h, w, 2n, d)`: each block of n positions preceded by the block
    before it (zeros before the first)."""
    blocks = rearrange(t, "b h (w n) d -> (b h) w n d", n=block)
    previous = F.pad(blocks, (0, 0, 0, 0, 1, -1))  # the blocks one step later, zeros in front
    return torch.cat((previous, blocks), dim=-2)


def local_attend(q: Tensor, k: Tensor, v: Tensor, window: int,
                 layout: Callable[[Tensor, int], Tensor] = with_previous_block) -> Tensor:
    """Causal sliding-window attention: position t attends to positions t - window .. t.

    `(b, h, n, d) -> (b, h, n, d)`. Computed blockwise on SDPA (queries in blocks of `window`
    against their own and the previous block), so cost is linear in n. Any n works: the tail is
    padded after the last position, which causality keeps invisible. `layout` builds the keys and
    values of each block (`with_previous_block` or a kernel with its semantics).
    """
    n = q.shape[-2]
    if n <= window + 1:  # every position already sees its whole past
        return attend(q, k, v, causal=True)
    pad = -n % window
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    blocks = (n + pad) // window
    # blocks of queries against (previous block ++ own block) of keys; 4-D keeps SDPA on its fused kernel
    qb = rearrange(q, "b h (w n) d -> (b h) w n d", n=window)
    k, v = (layout(t, window) for t in (k, v))
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=_local_mask(window, blocks, q.device))
    return rearrange(out, "(b h) w n d -> b h (w n) d", h=q.shape[1])[:, :, :n]


class Attention(nn.Module):
    """Multi-head self-attention, `(b, n, dim) -> (b, n, dim)`.

    Full (`window_size=None`) or causal sliding-window attention (`window_size=w`: each position
    sees the previous `w`); `causal` masks the future; `rotary` adds rotary position embeddings.

    Decoding (causal only): `forward(x, cache=KVCache(...))` stores the keys and values of x's
    positions in the cache; into an empty cache x may hold a whole prompt (attended as usual),
    afterwards one new position at a time, which attends to everything the cache holds.
    """

    # the sliding window's key/value layout: a hook, so that `hiertrans.cpu_kernels` can swap in a kernel
    window_layout = staticmethod(with_previous_block)

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        causal: bool = False,
        window_size: int | None = None,
        rotary: bool = False,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        out_bias: bool = True,
    ):
        super().__init__()
        if window_size is not None and not causal:
            raise ValueError("window_size is only supported for causal attention")
        self.heads, self.causal, self.window_size = heads, causal, window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=qkv_bias)
        self.proj = nn.Linear(heads * dim_head, dim, bias=out_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rotary = RotaryEmbedding(dim_head) if rotary else None

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """`mask`: optional boolean attention mask for `attend` (True = may attend), e.g. `(b, 1, 1, n)`.
        `cache`: decoding state (see the class)."""
        if cache is not None:
            if not self.causal or mask is not None:
                raise ValueError("a KV cache is for causal attention without a mask")
            if cache.length:
                return self.step(x, cache)
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if cache is not None:  # the prefill: remember the keys and values, attend as without a cache
            cache.update(torch.stack((k, v), dim=1))
        if self.window_size is not None:
            if mask is not None:
                raise ValueError("sliding-window attention does not take a mask")
            out = local_attend(q, k, v, self.window_size, self.window_layout)
        else:
            dropout = self.attn_drop if self.training else 0.0
            out = attend(q, k, v, causal=self.causal, dropout=dropout, mask=mask)
        return self.proj_drop(self.proj(merge_heads(out)))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """One new position `x (b, 1, dim)` against every cached one: all in its past (or window)."""
        if x.shape[-2] != 1:
            raise ValueError(f"after the prefill, decode one position at a time, got {x.shape[-2]}")
        qkv = self.qkv(x).view(x.shape[0], 3, self.heads, 1, -1)  # one position: the head split is a view
        if self.rotary is not None:
            self.rotary.rotate_(qkv[:, :2], cache.length)  # queries and keys in one pass
        keys, values, filled = cache.step(qkv[:, 1:])
        out = self.proj(attend(qkv[:, 0], keys, values, mask=filled).view(x.shape[0], 1, -1))
        return self.proj_drop(out) if self.proj_drop.p else out
