"""`Transformer`: the flat causal decoder, the control every hierarchical experiment needs.

The same layers as `HierarchicalTransformer` (attention on SDPA with rotary embeddings, RMSNorm,
the feed-forward, optionally the token shift), without compression or merges.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .hub import HubMixin
from .layers import BlockCache, CausalBlock, GradCheckpointing, RMSNorm, check_token_ids
from .lm import Generates, check_continuation, next_token_targets


@dataclass
class TransformerCache:
    """`Transformer`'s decoding state: one `BlockCache` per layer and the positions seen."""

    blocks: list[BlockCache]
    length: int = 0


class Transformer(nn.Module, HubMixin, Generates, GradCheckpointing):
    """Flat causal pre-norm transformer language model: `ids (b, n) -> logits (b, n, num_tokens)`.

    token embedding -> `depth` x [`x + attn(norm(x))`, `x + ff(norm(x))`] -> RMSNorm -> logits.
    Attention: `heads` x `dim_head`, causal, rotary, over the last `window_size` positions when
    set (full otherwise); feed-forward: GELU, `ff_mult * dim` wide; no biases in either, as in
    `HierarchicalTransformer`'s blocks. `token_shift=True` gives the blocks its token shift too, so
    that the hierarchy is the only difference to `HierarchicalTransformer(hierarchies=...)`.

    `forward(ids, return_loss=True)`: `ids (b, n + 1)`, or `ids (b, n)` with `labels (b, n)`;
    returns `(ce, (ce,))`, the next-token cross-entropy skipping `ignore_index` (default -1, so
    token 0 counts), shaped like `HierarchicalTransformer`'s `(total, parts)`. There are no
    auxiliary losses. The forward has no host syncs and compiles with `fullgraph=True`; token-id
    values are checked in debug mode only (`hiertrans.set_debug`), and always in `generate`.

    Decoding (`hiertrans.protocols.IncrementalCausalLM`): `cache = model.init_cache()`, then
    `model.decode(prompt, cache)` and `model.decode(next_ids (b, 1), cache)` return the logits of
    the new positions from per-layer key/value caches (a window keeps only its last
    `window_size + 1` keys); `generate` samples that way.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        depth: int,
        seq_len: int = 2048,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: float = 4,
        window_size: int | None = None,
        token_shift: bool = False,
        ignore_index: int = -1,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth), ("seq_len", seq_len),
                            ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary embeddings rotate feature pairs), got {dim_head}")
        if not isinstance(ff_mult, (int, float)) or isinstance(ff_mult, bool) or int(dim * ff_mult) < 1:
            raise ValueError(f"ff_mult must be a positive number (feed-forward width ff_mult * dim >= 1), "
                             f"got {ff_mult!r}")
        if window_size is not None and (not isinstance(window_size, int) or isinstance(window_size, bool)
                                        or window_size < 1):
            raise ValueError(f"window_size must be None (full attention) or a positive int, got {window_size!r}")
        self.num_tokens, self.seq_len, self.ignore_index = num_tokens, seq_len, ignore_index

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList([
            CausalBlock(dim, heads, dim_head, ff_mult, window_size, token_shift) for _ in range(depth)
        ])
        self.norm = RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, ids: Tensor, return_loss: bool = False, labels: Tensor | None = None):
        """`ids (b, n)` -> logits `(b, n, num_tokens)`; with `return_loss`, `(ce, (ce,))` (see the class)."""
        if return_loss:
            ids, labels = next_token_targets(ids, labels)
        check_token_ids(ids, self.num_tokens, self.seq_len)
        x = self.token_emb(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.to_logits(self.norm(x))
        if not return_loss:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index)
        return ce, (ce,)

    def init_cache(self) -> TransformerCache:
        """An empty decoding state for `decode` (its tensors are allocated at the first call)."""
        return TransformerCache([block.init_cache(self.seq_len) for block in self.blocks])

    def decode(self, ids: Tensor, cache: TransformerCache) -> Tensor:
        """Incremental forward: `ids (b, n)` continue the sequence `cache` holds (a prompt into an empty
        cache, then one token per call) -> their logits `(b, n, num_tokens)`."""
        check_continuation(ids, cache.length, self.num_tokens, self.seq_len)
        x = self.token_emb(ids)
        for block, block_cache in zip(self.blocks, cache.blocks):
            x = block(x, block_cache)
        cache.length += ids.shape[1]
        return self.to_logits(self.norm(x))
