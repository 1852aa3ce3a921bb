"""Decoding state: what an attention layer and a causal block keep between generation steps.

Plain tensors and slice writes, on any device. A cache is filled either by one call with a whole
prompt (the prefill) or one position at a time after it; the models check which.
"""

import torch
from torch import Tensor


def write_ring(store: Tensor, new: Tensor, slot: int) -> None:
    """Copy `new (..., n, d)`, n <= capacity, into the ring `store (..., capacity, d)` from `slot` on."""
    capacity, n = store.shape[-2], new.shape[-2]
    head = min(n, capacity - slot)
    store[..., slot : slot + head, :] = new[..., :head, :]
    if head < n:  # wrapped around
        store[..., : n - head, :] = new[..., head:, :]


class KVCache:
    """Keys and values of one attention layer while decoding, in one tensor `(b, 2, heads, capacity,
    dim_head)` (one write per step), allocated at the first `update` (batch, dtype and device are
    the keys').

    Position p lives in slot `p % capacity`, a ring: full attention sizes it to the whole context
    (it never wraps), a sliding window over the previous w positions to w + 1 slots, all that a
    query there ever reads. Keys are stored after the rotary rotation, so a query attends to the
    filled slots in any order.
    """

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity, self.length = capacity, 0
        self.store: Tensor | None = None

    def update(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Store the keys and values `kv (b, 2, h, n, d)` of positions `length .. length + n - 1`;
        return the stored keys and values, `(b, h, min(length, capacity), d)` each: after a single
        new position, exactly those its query attends to."""
        n = kv.shape[-2]
        if self.store is None:
            self.store = kv.new_zeros(*kv.shape[:3], self.capacity, kv.shape[-1])
        keep = min(n, self.capacity)  # of a long prefill, only the last `capacity` positions stay
        write_ring(self.store, kv[..., n - keep :, :], (self.length + n - keep) % self.capacity)
        self.length += n
        return self.store[..., : min(self.length, self.capacity), :].unbind(1)

    def step(self, kv: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """`update` with one new position `kv (b, 2, h, 1, d)` after the prefill -> `(keys, values,
        mask)`. Eager: the filled slots and no mask. Under `torch.compile`: every slot and a boolean
        mask `(1, 1, 1, capacity)` of the filled ones, so that no shape depends on the position and one graph
        serves every step (the position itself becomes a symbolic int after the first recompile)."""
        slot = self.length % self.capacity
        self.store[..., slot : slot + 1, :] = kv
        self.length += 1
        if not torch.compiler.is_compiling():
            stored = self.store if self.length >= self.capacity else self.store[..., : self.length, :]
            return *stored.unbind(1), None
        filled = torch.arange(self.capacity, device=kv.device) < torch.sym_min(self.length, self.capacity)
        return *self.store.unbind(1), filled[None, None, None]  # 4-D: SDPA's fused CPU kernel


class BlockCache:
    """A causal block's decoding state: its attention's `KVCache` (`kv`), the last input of each
    token-shifted sublayer (`previous`, `(b, 1, dim)` by sublayer name) and the positions seen."""

    def __init__(self, capacity: int):
        self.kv = KVCache(capacity)
        self.previous: dict[str, Tensor] = {}
        self.length = 0
