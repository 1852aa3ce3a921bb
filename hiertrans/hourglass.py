"""`HourglassTransformer`: the Hourglass language model of Nawrot et al. 2021, "Hierarchical
Transformers Are More Efficient Language Models" (arXiv 2110.13711), on the shared layers.

    ids -> embedding -> full-resolution layers
        -> [shift right by k - 1 -> pool chunks of k -> shortened layers (recursively: another
            hourglass inside) -> upsample by k] + residual
        -> full-resolution layers -> norm -> logits

The shortened layers run on n / k tokens (n / (k1 k2) one level deeper...), so most of the
depth costs a fraction of a full-resolution layer; the shift keeps it causal: shortened token j
pools positions `j*k - k + 1 .. j*k`, and position t reads token `t // k`, so nothing after t
reaches t.

einops notation: b batch, n positions, m shortened positions, k shortening factor, d features.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .hub import HubMixin
from .layers import (
    BlockCache,
    CausalBlock,
    FeedForward,
    GradCheckpointing,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
    check_token_ids,
    merge_heads,
    split_heads,
)
from .lm import Generates, causal_windows, check_continuation, newest, next_token_targets

DOWNSAMPLING = ("linear", "average")
UPSAMPLING = ("linear", "attention")


class LinearUpsample(nn.Module):
    """`x + up(tokens)`: position `j*k + i` adds row i of a linear map of shortened token j.

    `tokens (b, m, d)` are shortened tokens `first .. first + m - 1`; `x (b, n, d)` the residual at
    positions `start .. start + n - 1`, each of which must read one of those tokens.
    """

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim, factor * dim)

    def forward(self, tokens: Tensor, x: Tensor, first: int = 0, start: int = 0) -> Tensor:
        up = rearrange(self.proj(tokens), "b m (k d) -> b (m k) d", k=self.factor)
        offset = start - first * self.factor
        return x + up[:, offset : offset + x.shape[1]]


class AttentionUpsample(nn.Module):
    """Attention upsampling: linear upsampling (`LinearUpsample`, with the residual), then every
    position t attends to the shortened tokens it may see (`j * k <= t`), then a feed-forward;
    pre-norm residuals, rotary phases at the full-resolution positions (token j sits at `j * k`).

    Decoding: the keys and values of the shortened tokens go to a `KVCache`.
    """

    def __init__(self, dim: int, factor: int, heads: int, dim_head: int, ff_mult: float):
        super().__init__()
        self.factor, self.heads = factor, heads
        self.linear = LinearUpsample(dim, factor)
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.proj = nn.Linear(heads * dim_head, dim, bias=False)
        self.rotary = RotaryEmbedding(dim_head)
        self.ff_norm = RMSNorm(dim)
        self.ff = FeedForward(dim, int(dim * ff_mult), bias=False)

    def forward(self, tokens: Tensor, x: Tensor, first: int = 0, start: int = 0, new: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """As `LinearUpsample`; `new` (default: all of `tokens`) are the tokens not yet in `cache`."""
        x = self.linear(tokens, x, first, start)
        new = tokens if new is None else new
        n, m, k = x.shape[1], new.shape[1], self.factor
        first_new = -(-start // k) if cache is not None else first  # index of new[0]
        rotation = self.rotary.rotation(max(start + n, (first_new + m) * k), x.device)
        q = apply_rotary(split_heads(self.to_q(self.norm(x)), self.heads), rotation[start : start + n])
        keys, values = (split_heads(t, self.heads) for t in self.to_kv(new).chunk(2, dim=-1))
        keys = apply_rotary(keys, rotation[first_new * k : (first_new + m) * k : k])
        mask = None
        if cache is not None:
            decoding = cache.length > 0
            cached = cache.update(torch.stack((keys, values), dim=1))
            if decoding:  # one position: every cached token is in its past
                keys, values = cached
        if cache is None or not decoding:
            positions = torch.arange(start, start + n, device=x.device)[:, None]
            mask = torch.arange(first_new, first_new + m, device=x.device)[None] * k <= positions
        x = x + self.proj(merge_heads(attend(q, keys, values, mask=mask)))
        return x + self.ff(self.ff_norm(x))


@dataclass
class LevelCache:
    """`HourglassLevel`'s decoding state: its layers' caches (`BlockCache`s, and a `LevelCache` for
    the next level), the upsampling attention's, the last k - 1 inputs (for the next shortened
    token) and the newest shortened token after the layers."""

    layers: list["BlockCache | LevelCache"]
    upsample: KVCache | None
    history: Tensor | None = None
    latest: Tensor | None = None
    length: int = 0


class HourglassLevel(nn.Module):
    """One shortening level: `x (b, n, dim) -> (b, n, dim)`, `x + upsample(layers(shorten(x)))`.

    Shortening by `factor` k: token j pools inputs `j*k - k + 1 .. j*k` (the input shifted right by
    k - 1, zeros in front, in chunks of k): linear pooling (a linear map of the k inputs) or average
    pooling. `depths` has `2 * len(factors) - 1` entries: this level's layers before the next level,
    the next level's, ..., this level's layers after it (the innermost: one stack).
    """

    def __init__(self, dim: int, depths: Sequence[int], factors: Sequence[int], heads: int, dim_head: int,
                 ff_mult: float, downsample: str, upsample: str, dropout: float = 0.0):
        super().__init__()
        self.factor = k = factors[0]

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList([CausalBlock(dim, heads, dim_head, ff_mult, dropout=dropout) for _ in range(count)])

        self.pool = nn.Linear(k * dim, dim) if downsample == "linear" else None
        self.pre = blocks(depths[0])
        self.inner = None
        self.post = blocks(0)
        if len(depths) > 1:
            self.inner = HourglassLevel(dim, depths[1:-1], factors[1:], heads, dim_head, ff_mult, downsample, upsample,
                                        dropout)
            self.post = blocks(depths[-1])
        self.norm = RMSNorm(dim)
        self.upsample = (LinearUpsample(dim, k) if upsample == "linear"
                         else AttentionUpsample(dim, k, heads, dim_head, ff_mult))

    def stack(self) -> list[nn.Module]:
        """The layers on the shortened sequence, in order: this level's, the next level, this level's."""
        return [*self.pre, *([self.inner] if self.inner is not None else []), *self.post]

    def shorten(self, windows: Tensor) -> Tensor:
        """`(b, m, d, k)` windows of k inputs -> `(b, m, d)` shortened tokens."""
        if self.pool is None:
            return windows.mean(dim=-1)
        return self.pool(rearrange(windows, "b m d k -> b m (k d)"))

    def forward(self, x: Tensor, cache: LevelCache | None = None) -> Tensor:
        k, start = self.factor, 0 if cache is None else cache.length
        windows, history = causal_windows(x, k, k, None if cache is None else cache.history, start)
        tokens = self.shorten(windows)
        if tokens.shape[1]:  # while decoding, most positions complete no shortened token
            for layer, layer_cache in zip(self.stack(), [None] * len(self.stack()) if cache is None else cache.layers):
                tokens = layer(tokens, layer_cache)
        tokens = self.norm(tokens)
        if cache is None:
            return self.upsample(tokens, x)
        # positions start .. read tokens start // k ..: the newest earlier one, then the new ones
        first = -(-start // k) - 1
        latest = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1]) if cache.latest is None else cache.latest
        known = torch.cat((latest, tokens), dim=1)
        cache.history, cache.latest, cache.length = history, newest(cache.latest, tokens), start + x.shape[1]
        if isinstance(self.upsample, AttentionUpsample):
            return self.upsample(known, x, first, start, new=tokens, cache=cache.upsample)
        return self.upsample(known, x, first, start)

    def init_cache(self, capacity: int) -> LevelCache:
        """Decoding state for up to `capacity` inputs."""
        shortened = -(-capacity // self.factor)
        return LevelCache(layers=[layer.init_cache(shortened) for layer in self.stack()],
                          upsample=KVCache(shortened) if isinstance(self.upsample, AttentionUpsample) else None)


@dataclass
class HourglassCache:
    """`HourglassTransformer`'s decoding state: the full-resolution blocks' caches and the level's."""

    pre: list[BlockCache]
    level: LevelCache
    post: list[BlockCache] = field(default_factory=list)
    length: int = 0


class HourglassTransformer(nn.Module, HubMixin, Generates, GradCheckpointing):
    """Hourglass language model (Nawrot et al. 2021): `ids (b, n) -> logits (b, n, num_tokens)`.

    The hierarchy is `depths` and `shorten_factors`: `depths` lists the layers from the outside
    in and back out, `2 * len(shorten_factors) + 1` of them; level i shortens the level above by
    `shorten_factors[i]`. The paper's notation gives the layers `@` the total shortening:

        "2@1 4@3 2@1"          depths=(2, 4, 2),        shorten_factors=(3,)
        "5@1 24@3 5@1"         depths=(5, 24, 5),       shorten_factors=(3,)    (its enwik8 model)
        "1@1 2@2 8@6 2@2 1@1"  depths=(1, 2, 8, 2, 1),  shorten_factors=(2, 3)

    (`hourglass_hierarchy("2@1 4@3 2@1")` converts.) Each layer is a pre-norm causal block
    (`layers.CausalBlock`: rotary attention with `heads` x `dim_head`, a GELU feed-forward
    `ff_mult * dim` wide, no biases); `window_size` makes the full-resolution layers' attention a
    sliding window over that many positions (the shortened layers attend to all of theirs).
    `downsample`: `linear` (a linear map of the k pooled inputs, the paper's best) or `average`.
    `upsample`: `linear` (a linear map to k positions per token, the paper's choice for text) or
    `attention` (then attention to the shortened tokens and a feed-forward). `dropout`: on the
    embeddings and on every layer's sublayer outputs, in training only. Lengths need not be
    multiples of the factors. Strictly causal: logits at t depend on `ids[:, :t + 1]` only.

    `forward(ids, return_loss=True)`: `ids (b, n + 1)`, or `ids (b, n)` with `labels (b, n)`;
    returns `(ce, (ce,))`, skipping `ignore_index`, as `Transformer`. The forward has no host syncs
    and compiles with `fullgraph=True`. Decoding (`hiertrans.protocols.IncrementalCausalLM`):
    `init_cache()` / `decode(ids, cache)`: a new shortened token is computed through its layers
    only when a chunk of k completes; `generate` samples that way.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        seq_len: int = 2048,
        depths: Sequence[int] = (2, 4, 2),
        shorten_factors: Sequence[int] = (3,),
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: float = 4,
        window_size: int | None = None,
        downsample: Literal["linear", "average"] = "linear",
        upsample: Literal["linear", "attention"] = "linear",
        ignore_index: int = -1,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("seq_len", seq_len), ("heads", heads),
                            ("dim_head", dim_head)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary embeddings rotate feature pairs), got {dim_head}")
        factors, depths = tuple(shorten_factors), tuple(depths)
        if not factors or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in factors):
            raise ValueError(f"shorten_factors must be one or more ints >= 2 (one per level), got {shorten_factors!r}")
        if len(depths) != 2 * len(factors) + 1 or not all(isinstance(d, int) and d >= 0 for d in depths):
            raise ValueError(f"depths must be {2 * len(factors) + 1} ints >= 0 for {len(factors)} shortening "
                             f"level(s) (layers before each level, the innermost, after each), got {depths!r}")
        if depths[len(factors)] < 1:
            raise ValueError(f"the innermost level needs layers: depths[{len(factors)}] must be >= 1, got {depths!r}")
        if not isinstance(ff_mult, (int, float)) or isinstance(ff_mult, bool) or int(dim * ff_mult) < 1:
            raise ValueError(f"ff_mult must be a positive number (feed-forward width ff_mult * dim >= 1), "
                             f"got {ff_mult!r}")
        if window_size is not None and (not isinstance(window_size, int) or isinstance(window_size, bool)
                                        or window_size < 1):
            raise ValueError(f"window_size must be None (full attention) or a positive int, got {window_size!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
        self.num_tokens, self.seq_len, self.ignore_index = num_tokens, seq_len, ignore_index
        self.depths, self.shorten_factors = depths, factors

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.emb_drop = nn.Dropout(dropout)

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList([CausalBlock(dim, heads, dim_head, ff_mult, window_size, dropout=dropout)
                                  for _ in range(count)])

        self.pre = blocks(depths[0])
        self.level = HourglassLevel(dim, depths[1:-1], factors, heads, dim_head, ff_mult, downsample, upsample,
                                    dropout)
        self.post = blocks(depths[-1])
        self.norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, ids: Tensor, return_loss: bool = False, labels: Tensor | None = None):
        """`ids (b, n)` -> logits `(b, n, num_tokens)`; with `return_loss`, `(ce, (ce,))` (see the class)."""
        if return_loss:
            ids, labels = next_token_targets(ids, labels)
        check_token_ids(ids, self.num_tokens, self.seq_len)
        x = self.emb_drop(self.token_emb(ids))
        for block in self.pre:
            x = block(x)
        x = self.level(x)
        for block in self.post:
            x = block(x)
        logits = self.to_logits(self.norm(x))
        if not return_loss:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index)
        return ce, (ce,)

    def init_cache(self) -> HourglassCache:
        """An empty decoding state for `decode` (its tensors are allocated at the first call)."""
        return HourglassCache(pre=[block.init_cache(self.seq_len) for block in self.pre],
                              level=self.level.init_cache(self.seq_len),
                              post=[block.init_cache(self.seq_len) for block in self.post])

    def decode(self, ids: Tensor, cache: HourglassCache) -> Tensor:
        """Incremental forward: `ids (b, n)` continue the sequence `cache` holds (a prompt into an empty
        cache, then one token per call) -> their logits `(b, n, num_tokens)`."""
        check_continuation(ids, cache.length, self.num_tokens, self.seq_len)
        x = self.token_emb(ids)
        for block, block_cache in zip(self.pre, cache.pre):
            x = block(x, block_cache)
        x = self.level(x, cache.level)
        for block, block_cache in zip(self.post, cache.post):
            x = block(x, block_cache)
        cache.length += ids.shape[1]
        return self.to_logits(self.norm(x))


def hourglass_hierarchy(notation: str) -> dict[str, tuple[int, ...]]:
    """The paper's hierarchy notation -> `HourglassTransformer` arguments:
    `"2@1 4@3 2@1"` -> `{"depths": (2, 4, 2), "shorten_factors": (3,)}` (`layers@total shortening`,
    outside in and back out; each total a multiple of the one outside it)."""
    try:
        levels = [tuple(int(part) for part in level.split("@")) for level in notation.split()]
        if any(len(level) != 2 for level in levels):
            raise ValueError
    except ValueError:
        raise ValueError(f"hierarchy notation is 'layers@shortening ...' such as '2@1 4@3 2@1', "
                         f"got {notation!r}") from None
    totals = [total for _, total in levels]
    half = len(levels) // 2
    if len(levels) % 2 == 0 or totals != totals[::-1] or totals[0] != 1 or len(levels) < 3:
        raise ValueError(f"hierarchy {notation!r} must go in and back out symmetrically from @1, e.g. '2@1 4@3 2@1'")
    inward = totals[: half + 1]
    if any(b <= a or b % a for a, b in zip(inward, inward[1:])):
        raise ValueError(f"hierarchy {notation!r}: each shortening must be a multiple (> 1) of the one outside it")
    return {"depths": tuple(layers for layers, _ in levels),
            "shorten_factors": tuple(b // a for a, b in zip(inward, inward[1:]))}
